"""``Config``: every setting of a polar-mem-mamba run (model, MQAR task, training), validated.

One flat dataclass, loaded from YAML (``Config.from_yaml``) or a dict (``Config.from_dict``). An
unknown key or an invalid value raises ``ConfigError`` with one line naming the field and what it
expects. The model's building blocks are chosen by ``architecture``, one of the named
:data:`ARCHITECTURES` of the capacity-cliff study.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqmem_shared.data.mqar import FIRST_KEY


class ConfigError(ValueError):
    """A config file or field that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class Architecture:
    """Which components a named architecture uses.

    ``mixer``: token mixer of both stacks ("mamba2" or "attention"). ``encoder_attention``: bidirectional
    attention layers at ``n // 2`` and ``n - 1`` of the encoder. ``polarized``: decoder blocks fuse the
    A=0 / A=1 channels. ``memory_pool``: decoder blocks read/write the cross-layer memory pool.
    ``cross_attention``: GSA cross-attention at ``Config.cross_attn_layers``; the decoder then reads the
    encoder only through it. Without it the decoder reads the encoder output as a prefix of its stream
    (:attr:`encoder_prefix`), so the recurrent state is the path from the pairs to the queries.
    """

    mixer: str
    encoder_attention: bool = False
    polarized: bool = False
    memory_pool: bool = False
    cross_attention: bool = False
    description: str = ""

    @property
    def encoder_prefix(self) -> bool:
        return not self.cross_attention


ARCHITECTURES: dict[str, Architecture] = {
    "mamba2": Architecture("mamba2", description="pure Mamba-2, no attention anywhere (the cliff baseline)"),
    "polar": Architecture("mamba2", polarized=True, description="Mamba-2 + polarized A=0/A=1 channels"),
    "polar_pool": Architecture("mamba2", polarized=True, memory_pool=True,
                               description="polarized channels + cross-layer memory pool"),
    "hybrid": Architecture("mamba2", encoder_attention=True, polarized=True, memory_pool=True,
                           cross_attention=True,
                           description="full model: + encoder attention and GSA cross-attention"),
    "attention": Architecture("attention", description="transformer baseline (attention in both stacks)"),
}

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BACKENDS = ("auto", "torch")


@dataclass
class Config:
    """A polar-mem-mamba run. Defaults are the study's default model and MQAR setting.

    Model: ``d_model``, ``d_state`` (SSM state size per head: the capacity threshold), ``headdim``,
    ``expand``, ``d_conv``, ``chunk_size`` (Mamba-2), ``n_heads`` (attention), layer counts,
    ``cross_attn_layers`` (decoder layers followed by GSA cross-attention), the memory pool
    (``mem_pool_size`` entries of ``mem_summary_dim``, written every ``mem_update_freq`` layers).
    Task: MQAR with ``num_pairs`` key-value pairs and ``num_queries`` queries; ``vocab_size`` is the
    MQAR vocabulary (keys from ``[10, V/2)``, values from ``[V/2, V)``; the study uses 8192, small
    vocabularies make quick CPU runs). Training: AdamW with warmup + cosine, global ``batch_size``
    (split over ranks).
    ``backend``: "auto" uses mamba_ssm / causal_conv1d / flash_attn on CUDA when installed, "torch"
    forces the pure-PyTorch references.
    """

    # model
    architecture: str = "hybrid"
    d_model: int = 256
    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 64
    n_heads: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    cross_attn_layers: tuple[int, ...] = (0, 2)
    mem_pool_size: int = 50
    mem_summary_dim: int = 64
    mem_update_freq: int = 4
    dropout: float = 0.0
    backend: str = "auto"
    # task
    num_pairs: int = 128
    num_queries: int = 16
    vocab_size: int = 8192
    # training
    batch_size: int = 256
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 4000
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    # evaluation and outputs
    eval_every: int = 500
    eval_examples: int = 2048
    eval_batch_size: int = 256
    eval_seed: int = 1234
    log_every: int = 50
    save_every: int = 500
    out_dir: str = "outputs"
    run_name: str = ""
    checkpoint: str | None = None
    progress: bool = True
    _source: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            check(self, name)
        self._check_relations()

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> Config:
        """Build from a mapping; unknown keys and invalid values raise :class:`ConfigError`."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}Config: expected a mapping of field: value, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; expected one of {', '.join(names)}"
                raise ConfigError(f"{where}Config: unknown field {key!r}{hint}")
        try:
            return cls(**dict(data), _source=source)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Config:
        """Load a YAML file of ``field: value`` lines (an empty file gives the defaults)."""
        data = read_yaml(path)
        config = cls.from_dict(data, source=str(path))
        if not config.run_name:
            config.run_name = Path(path).stem
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict; ``Config.from_dict(c.to_dict()) == c``."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out["cross_attn_layers"] = list(self.cross_attn_layers)
        out["betas"] = list(self.betas)
        return out

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        return Config.from_dict({**self.to_dict(), **changes}, source=self._source)

    # ---------------------------------------------------------------------------- derived

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.run_name or self.architecture)

    def _check_relations(self) -> None:
        if self.arch.mixer == "mamba2" and self.d_inner % self.headdim:
            _fail("headdim", f"a divisor of expand * d_model = {self.d_inner}", self.headdim)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            _fail("n_heads", f"a divisor of d_model={self.d_model} giving an even head size", self.n_heads)
        bad = [i for i in self.cross_attn_layers if i >= self.decoder_layers]
        if bad and self.arch.cross_attention:
            _fail("cross_attn_layers", f"layer indices in [0, decoder_layers={self.decoder_layers})",
                  list(self.cross_attn_layers))
        if self.warmup_steps > self.max_steps:
            _fail("warmup_steps", f"an integer <= max_steps={self.max_steps}", self.warmup_steps)
        most = min(self.vocab_size // 2 - FIRST_KEY, self.vocab_size - self.vocab_size // 2)
        if self.num_pairs > most:
            _fail("num_pairs", f"at most {most} (distinct keys and values of vocab_size={self.vocab_size})",
                  self.num_pairs)
        if self.num_queries > self.num_pairs:
            _fail("num_queries", f"an integer <= num_pairs={self.num_pairs}", self.num_queries)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``, with one-line errors for a missing, unparsable or non-mapping file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------- validation


def _fail(name: str, expected: str, value: Any) -> None:
    raise ConfigError(f"Config.{name}: expected {expected}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(minimum: int) -> Callable[[Config, str], None]:
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def check(cfg: Config, name: str) -> None:
        v = getattr(cfg, name)
        if not _is_int(v) or v < minimum:
            _fail(name, expected, v)
    return check


def _float(lo: float, hi: float, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Config, str], None]:
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    expected = f"a number in {left}{lo:g}, {hi:g}{right}"

    def check(cfg: Config, name: str) -> None:
        raw = getattr(cfg, name)
        v = _to_float(raw)
        if v is None or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            _fail(name, expected, raw)
        setattr(cfg, name, v)
    return check


def _to_float(v: Any) -> float | None:
    """Numbers and numeric strings (YAML 1.1 reads ``3e-4`` as a string) as a finite float, else None."""
    if isinstance(v, bool):
        return None
    try:
        v = float(v) if isinstance(v, (int, float, str)) else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def _choice(choices: tuple[str, ...]) -> Callable[[Config, str], None]:
    def check(cfg: Config, name: str) -> None:
        v = getattr(cfg, name)
        if v not in choices:
            _fail(name, "one of " + ", ".join(repr(c) for c in choices), v)
    return check


def _bool(cfg: Config, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        _fail(name, "true or false", getattr(cfg, name))


def _str(cfg: Config, name: str) -> None:
    if not isinstance(getattr(cfg, name), str):
        _fail(name, "a string", getattr(cfg, name))


def _optional_path(cfg: Config, name: str) -> None:
    v = getattr(cfg, name)
    if v is not None and (not isinstance(v, str) or not v):
        _fail(name, "a file path or null", v)


def _layer_tuple(cfg: Config, name: str) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v)
    if not ok:
        _fail(name, "a list of distinct layer indices >= 0", v)
    setattr(cfg, name, tuple(sorted(v)))


def _betas(cfg: Config, name: str) -> None:
    v = cfg.betas
    pair = tuple(_to_float(b) for b in v) if isinstance(v, (list, tuple)) and len(v) == 2 else None
    if pair is None or any(b is None or not 0.0 <= b < 1.0 for b in pair):
        _fail(name, "two numbers in [0, 1)", v)
    cfg.betas = pair  # type: ignore[assignment]


_CHECKS: dict[str, Callable[[Config, str], None]] = {
    "architecture": _choice(tuple(ARCHITECTURES)),
    "d_model": _int(1),
    "d_state": _int(1),
    "headdim": _int(1),
    "expand": _int(1),
    "d_conv": _int(1),
    "chunk_size": _int(1),
    "n_heads": _int(1),
    "encoder_layers": _int(1),
    "decoder_layers": _int(1),
    "cross_attn_layers": _layer_tuple,
    "mem_pool_size": _int(1),
    "mem_summary_dim": _int(1),
    "mem_update_freq": _int(1),
    "dropout": _float(0.0, 1.0, hi_open=True),
    "backend": _choice(BACKENDS),
    "num_pairs": _int(1),
    "num_queries": _int(1),
    "vocab_size": _int(2 * FIRST_KEY + 2),
    "batch_size": _int(1),
    "learning_rate": _float(0.0, math.inf, lo_open=True),
    "weight_decay": _float(0.0, math.inf),
    "betas": _betas,
    "label_smoothing": _float(0.0, 1.0, hi_open=True),
    "grad_clip": _float(0.0, math.inf),
    "max_steps": _int(1),
    "warmup_steps": _int(0),
    "min_lr_ratio": _float(0.0, 1.0),
    "precision": _choice(PRECISIONS),
    "compile": _bool,
    "seed": _int(0),
    "eval_every": _int(0),
    "eval_examples": _int(1),
    "eval_batch_size": _int(1),
    "eval_seed": _int(0),
    "log_every": _int(0),
    "save_every": _int(0),
    "out_dir": _str,
    "run_name": _str,
    "checkpoint": _optional_path,
    "progress": _bool,
}
