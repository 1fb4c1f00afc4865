"""``ModelConfig``: the shape of a toy transformer, validated on construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from seqmem_shared.config import (
    Check,
    ConfigError,
    boolean,
    choice,
    from_dict,
    integer,
    number,
    optional,
    string,
    validate,
)

MODEL_TYPE = re.compile(r"^(attention_only|transformer)_([1-9][0-9]*)L$")
ATTENTION_IMPLS = ("auto", "quadratic", "linear")
NORMS = (None, "rms")
INITS = ("seed", "unit")
# Context length from which attention_impl="auto" uses the linear (state) form instead of the O(N^2)
# masked form. Measured on an H100 (2026-11-22, bench/bench_quadratic_attention.py, batch 1, 8 heads,
# d_head 32, bf16) with the chunkwise linear form that "auto" runs: forward+backward 3.3 vs 3.0 ms at 4096,
# 4.7 vs 11.6 ms at 8192, 8.9 vs 45.7 ms at 16384 (forward alone it already wins at 4096); memory
# 1.4 vs 20 GiB at 16384.
DEFAULT_LINEAR_CROSSOVER = 8192


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
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model if _is_int(self.d_model) else None
        validate(self, _CHECKS)
        if self.d_model % self.n_head:
            raise ConfigError.invalid(self, "n_head", f"a divisor of d_model={self.d_model}", self.n_head)
        if self.use_rope and self.d_head % 2:
            raise ConfigError.invalid(self, "n_head", f"a value giving an even d_head with RoPE "
                                      f"(d_model={self.d_model})", self.n_head)

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
        return from_dict(cls, d, strict=strict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[str, Check] = {
    "model_type": string(pattern=MODEL_TYPE.pattern,
                         expected="'attention_only_{n}L' or 'transformer_{n}L' (e.g. 'transformer_2L')"),
    "vocab_size": integer(1),
    "d_model": integer(1),
    "n_head": integer(1),
    "n_ctx": integer(1),
    "dropout": number(0.0, 1.0, hi_open=True),
    "d_mlp": optional(integer(1), expected="a positive integer or null (4 * d_model)"),
    "use_rope": boolean(),
    "tie_weights": boolean(),
    "qk_norm": boolean(),
    "norm": choice(*NORMS),
    "attention_impl": choice(*ATTENTION_IMPLS),
    "rope_base": number(0.0, lo_open=True),
    "bias": boolean(),
    "init_std": number(0.0, lo_open=True),
    "init": choice(*INITS),
    "linear_crossover": integer(1),
}
