"""``RetNetConfig``: the fields of fla's ``RetNetConfig`` (fla 0.6.0), as a validated dataclass.

``config.json`` files written by fla load with :meth:`RetNetConfig.from_dict` (keys fla no longer uses,
such as ``rms_norm_eps`` or ``share_conv_kernel``, are kept in ``extra`` and written back).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqmem_shared.config import Check, ConfigError, choice, integer, optional, validate
from seqmem_shared.io import atomic_write_json

ATTN_MODES = ("chunk", "fused_chunk", "parallel", "fused_recurrent")


@dataclass
class RetNetConfig:
    attn_mode: str = "chunk"
    hidden_size: int = 2048
    expand_k: float = 1.0
    expand_v: float = 2.0
    hidden_ratio: int | None = 2
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_heads: int = 8
    num_kv_heads: int | None = None
    feature_map: str | None = None
    hidden_act: str = "swish"
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    max_position_embeddings: int = 2048
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    attn: dict | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False
    vocab_size: int = 32000
    attnres_block_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "retnet"

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes (as fla's MultiScaleRetention and GatedMLP compute them) --
    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        size = int(self.hidden_size * ratio * 2 / 3)
        return 256 * ((size + 255) // 256)

    def validate(self) -> None:
        """Raise :class:`~seqmem_shared.config.ConfigError` (a ``ValueError``) naming the first field the
        reference cannot use."""
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError.invalid(self, name, expected, getattr(self, name))

        validate(self, _CHECKS)
        for name, dim in (("expand_k", self.hidden_size * self.expand_k),
                          ("expand_v", self.hidden_size * self.expand_v)):
            if abs(dim - round(dim)) > 1e-6 or round(dim) % self.num_heads:
                raise bad(name, f"hidden_size * {name} to be an integer divisible by "
                                f"num_heads={self.num_heads}")
        if self.head_k_dim % 2 or self.head_k_dim > 256:
            raise bad("expand_k", "an even head_k_dim <= 256 (rotary embedding)")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}")

    # -- serialization --
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "model_type": self.model_type, "architectures": ["RetNetForCausalLM"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetNetConfig:
        if d.get("model_type", "retnet") != "retnet":
            raise ValueError(f"config model_type={d['model_type']!r}: expected 'retnet'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in ("model_type", "architectures")}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RetNetConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no config.json (expected a directory holding config.json)")
        return cls.from_dict(json.loads(file.read_text()))

    def save_pretrained(self, path: str | Path) -> Path:
        return atomic_write_json(Path(path) / "config.json", self.to_dict())

    def num_parameters(self) -> int:
        """Parameter count of ``RetNetForCausalLM`` built from this config (analytic)."""
        H, L = self.hidden_size, self.num_hidden_layers
        kv_groups = self.num_heads // (self.num_kv_heads or self.num_heads)
        attn = H * self.key_dim + H * (self.key_dim + self.value_dim) // kv_groups + self.value_dim * H
        attn += H * self.value_dim if self.use_output_gate else 0
        attn += self.head_v_dim if self.elementwise_affine else 0
        mlp = 3 * H * self.mlp_intermediate_size
        per_layer = attn + mlp + 2 * H
        embed = self.vocab_size * H
        return L * per_layer + H + embed * (1 if self.tie_word_embeddings else 2)


_CHECKS: dict[str, Check] = {
    "attn_mode": choice(*ATTN_MODES),
    "hidden_size": integer(1),
    "num_hidden_layers": integer(1),
    "num_heads": integer(1),
    "num_kv_heads": optional(integer(1)),
    "vocab_size": integer(1),
    "use_short_conv": choice(False, expected="false (fla's RetNet layer never uses a short convolution)"),
    "feature_map": choice(None, expected="null (the reference implements RetNet without a q/k feature map)"),
    "hidden_act": choice("swish"),
    "attn": choice(None, expected="null (hybrid attention layers are not part of the reference)"),
    "attnres_block_size": choice(None, expected="null (attention residuals are not part of the reference)"),
}

RETNET_2_7B = dict(hidden_size=2560, num_hidden_layers=32, num_heads=10, expand_k=1, expand_v=2,
                   hidden_ratio=2, vocab_size=32000, norm_eps=1e-6, max_position_embeddings=2048,
                   attn_mode="fused_chunk",
                   tie_word_embeddings=False)
"""Architecture of fla-hub/retnet-2.7B-100B (2.72B parameters, state [10, 256, 512] per layer)."""
