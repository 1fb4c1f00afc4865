"""``ModelConfig``: the shape of a toy transformer, validated on construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODEL_TYPE = re.compile(r"^(attention_only|transformer)_([1-9][0-9]*)L$")
ATTENTION_IMPLS = ("auto", "quadratic", "linear")
NORMS = (None, "rms")
INITS = ("seed", "unit")
# Context length from which attention_impl="auto" uses the linear (state) form instead of the O(N^2)
# masked form. Measured on an H100 (2026-11-22, bench/bench_quadratic_attention.py, batch 1, 8 heads,
# d_head 32, bf16): the masked form is faster at every n_ctx up to 16384 (forward 18 ms vs 30 ms for the
# Triton linear form at 16384), so there is no time crossover; the linear form's advantage is memory
# (0.8 GiB vs 20 GiB at 16384). "auto" therefore switches only past 16384 tokens, where the N^2 scores
# stop fitting comfortably.
DEFAULT_LINEAR_CROSSOVER = 16384


@dataclass
class ModelConfig:
    """A polynomial toy transformer.

    ``model_type`` is ``attention_only_{n}L`` (attention blocks only) or ``transformer_{n}L`` (attention +
    bilinear MLP per block). ``d_mlp`` defaults to ``4 * d_model``. ``norm="rms"`` adds pre-norm RMSNorm
    (breaks the polynomial structure; the circuit analysis refuses it), ``qk_norm`` an RMSNorm on q and
    k per head. ``attention_impl`` picks the O(N^2) masked form, the linear (state) form, or ``"auto"``:
    linear from ``linear_crossover`` tokens on. ``bias`` adds biases to the attention q/k/v and MLP
    projections (the seed checkpoints have them). ``init="seed"`` draws weights from N(0, ``init_std``)
    (the seed's recipe), ``init="unit"`` keeps activations at unit RMS (see ``ToyTransformer``).
    """

    model_type: str = "attention_only_1L"
    vocab_size: int = 4096
    d_model: int = 256
    n_head: int = 4
    n_ctx: int = 256
    dropout: float = 0.0
    d_mlp: int | None = None
    use_rope: bool = True
    tie_weights: bool = True
    qk_norm: bool = False
    norm: str | None = None
    attention_impl: str = "auto"
    rope_base: float = 10000.0
    bias: bool = False
    init_std: float = 0.02
    init: str = "seed"
    linear_crossover: int = DEFAULT_LINEAR_CROSSOVER

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or not MODEL_TYPE.match(self.model_type):
            _fail("model_type", "'attention_only_{n}L' or 'transformer_{n}L' (e.g. 'transformer_2L')",
                  self.model_type)
        for name in ("vocab_size", "d_model", "n_head", "n_ctx", "linear_crossover"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, "a positive integer", v)
        if self.d_model % self.n_head:
            _fail("n_head", f"a divisor of d_model={self.d_model}", self.n_head)
        if self.use_rope and self.d_head % 2:
            _fail("n_head", f"a value giving an even d_head with RoPE (d_model={self.d_model})", self.n_head)
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if not _is_int(self.d_mlp) or self.d_mlp < 1:
            _fail("d_mlp", "a positive integer or null (4 * d_model)", self.d_mlp)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", "a float in [0, 1)", self.dropout)
        self.dropout = float(self.dropout)
        for name in ("use_rope", "tie_weights", "qk_norm", "bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "true or false", getattr(self, name))
        if self.norm not in NORMS:
            _fail("norm", "null or 'rms'", self.norm)
        if self.init not in INITS:
            _fail("init", "'seed' or 'unit'", self.init)
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail("attention_impl", "one of 'auto', 'quadratic', 'linear'", self.attention_impl)
        for name in ("rope_base", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                _fail(name, "a positive float", v)
            setattr(self, name, float(v))

    @property
    def n_layers(self) -> int:
        return int(MODEL_TYPE.match(self.model_type).group(2))

    @property
    def has_mlp(self) -> bool:
        return self.model_type.startswith("transformer")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def is_polynomial(self) -> bool:
        """True when the logits are a polynomial of the one-hot inputs (no norms)."""
        return self.norm is None and not self.qk_norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False) -> ModelConfig:
        """Build from a JSON dict. Keys that are not fields (the seed's ``num_batches``,
        ``final_train_loss``, ...) are ignored unless ``strict``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"ModelConfig: expected a mapping of field -> value, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if strict and unknown:
            raise ValueError(f"ModelConfig: unknown field {unknown[0]!r}; expected one of {', '.join(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"ModelConfig.{name}: expected {expected}, got {value!r}")
