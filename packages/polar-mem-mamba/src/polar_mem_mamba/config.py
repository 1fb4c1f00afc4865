"""``Config``: every setting of a polar-mem-mamba run (model, MQAR task, training), validated.

One flat dataclass, loaded from YAML (``Config.from_yaml``) or a dict (``Config.from_dict``). An
unknown key or an invalid value raises ``ConfigError`` with one line naming the field and what it
expects. The model's building blocks are chosen by ``architecture``, one of the named
:data:`ARCHITECTURES` of the capacity-cliff study.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqmem_shared.config import (
    Check,
    ConfigError,
    boolean,
    choice,
    config_fields,
    from_dict,
    integer,
    number,
    optional,
    sequence,
    string,
    validate,
)
from seqmem_shared.config import read_config_file as read_yaml
from seqmem_shared.data.mqar import FIRST_KEY
from seqmem_shared.train.config import TIME_LIMIT_S_CHECK

__all__ = ["ARCHITECTURES", "Architecture", "Config", "ConfigError", "read_yaml"]


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
    vocabularies make quick CPU runs); ``train_min_pairs`` (null: off) trains on a mixture, each example
    holding between ``train_min_pairs`` and ``num_pairs`` pairs (padded), as zoology trains MQAR on several
    pair counts; evaluation always uses ``num_pairs``. Training: AdamW with warmup + cosine, global
    ``batch_size`` (split over ranks); ``time_limit_s`` (null: none) ends a run after the first step at
    which it has trained that many seconds in this invocation, then evaluates and saves; rerunning resumes
    (see ``TrainConfig``; the lockstep sweep trainer ignores it). ``init_from`` (null: off) starts
    training from another run's model weights (a curriculum stage, e.g. the 8-pair model trained on
    16 pairs); optimizer, schedule and step start fresh, and resuming the run itself takes precedence.
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
    train_min_pairs: int | None = None
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
    time_limit_s: float | None = None
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
    init_from: str | None = None
    progress: bool = True
    _source: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self, _CHECKS)
        self._check_relations()

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def field_names(cls) -> list[str]:
        return config_fields(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> Config:
        """Build from a mapping; unknown keys and invalid values raise :class:`ConfigError` (prefixed by
        ``source``)."""
        return from_dict(cls, data, source, _source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Config:
        """Load a YAML file of ``field: value`` lines (an empty file gives the defaults; see
        :func:`seqmem_shared.config.read_config_file`)."""
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
        def fail(name: str, expected: str, value: Any) -> None:
            raise ConfigError.invalid(self, name, expected, value)

        if self.arch.mixer == "mamba2" and self.d_inner % self.headdim:
            fail("headdim", f"a divisor of expand * d_model = {self.d_inner}", self.headdim)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            fail("n_heads", f"a divisor of d_model={self.d_model} giving an even head size", self.n_heads)
        bad = [i for i in self.cross_attn_layers if i >= self.decoder_layers]
        if bad and self.arch.cross_attention:
            fail("cross_attn_layers", f"layer indices in [0, decoder_layers={self.decoder_layers})",
                 list(self.cross_attn_layers))
        if self.warmup_steps > self.max_steps:
            fail("warmup_steps", f"an integer <= max_steps={self.max_steps}", self.warmup_steps)
        most = min(self.vocab_size // 2 - FIRST_KEY, self.vocab_size - self.vocab_size // 2)
        if self.num_pairs > most:
            fail("num_pairs", f"at most {most} (distinct keys and values of vocab_size={self.vocab_size})",
                 self.num_pairs)
        if self.num_queries > self.num_pairs:
            fail("num_queries", f"an integer <= num_pairs={self.num_pairs}", self.num_queries)
        low = self.train_min_pairs
        if low is not None and not self.num_queries <= low <= self.num_pairs:
            fail("train_min_pairs", f"null or an integer in [num_queries={self.num_queries}, "
                 f"num_pairs={self.num_pairs}]", low)
        if low == self.num_pairs:  # no mixture: one spelling, so grids and finished runs compare equal
            self.train_min_pairs = None


# --------------------------------------------------------------------------------- validation

_CHECKS: dict[str, Check] = {
    "architecture": choice(*ARCHITECTURES),
    "d_model": integer(1),
    "d_state": integer(1),
    "headdim": integer(1),
    "expand": integer(1),
    "d_conv": integer(1),
    "chunk_size": integer(1),
    "n_heads": integer(1),
    "encoder_layers": integer(1),
    "decoder_layers": integer(1),
    "cross_attn_layers": sequence(integer(0), distinct=True, sort=True,
                                  expected="a list of distinct layer indices >= 0"),
    "mem_pool_size": integer(1),
    "mem_summary_dim": integer(1),
    "mem_update_freq": integer(1),
    "dropout": number(0.0, 1.0, hi_open=True),
    "backend": choice(*BACKENDS),
    "num_pairs": integer(1),
    "num_queries": integer(1),
    "vocab_size": integer(2 * FIRST_KEY + 2),
    "train_min_pairs": optional(integer(1), expected="null or an integer >= 1"),
    "batch_size": integer(1),
    "learning_rate": number(0.0, lo_open=True),
    "weight_decay": number(0.0),
    "betas": sequence(number(0.0, 1.0, hi_open=True), length=2, expected="two numbers in [0, 1)"),
    "label_smoothing": number(0.0, 1.0, hi_open=True),
    "grad_clip": number(0.0),
    "max_steps": integer(1),
    "warmup_steps": integer(0),
    "min_lr_ratio": number(0.0, 1.0),
    "precision": choice(*PRECISIONS),
    "compile": boolean(),
    "seed": integer(0),
    "time_limit_s": TIME_LIMIT_S_CHECK,
    "eval_every": integer(0),
    "eval_examples": integer(1),
    "eval_batch_size": integer(1),
    "eval_seed": integer(0),
    "log_every": integer(0),
    "save_every": integer(0),
    "out_dir": string(),
    "run_name": string(),
    "checkpoint": optional(string(nonempty=True), expected="a file path or null"),
    "init_from": optional(string(nonempty=True), expected="a checkpoint path or null"),
    "progress": boolean(),
}
