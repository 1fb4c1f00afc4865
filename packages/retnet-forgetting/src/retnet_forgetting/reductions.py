"""State reductions and the de-rotated view.

A retnet-2.7B state is [10, 256, 512] per layer (131k numbers per head), so stores keep reductions:

- ``"none"``: the full state ``[H, Dk, Dv]`` flattened per head (tiny models only);
- ``"bilinear"``: ``P^T S Q`` per head with fixed Gaussian ``P [Dk, rank_k]``, ``Q [Dv, rank_v]`` (a
  structured random projection that keeps the key/value factorization): ``[H, rank_k * rank_v]``;
- ``"value_mean"``: ``mean_k S`` per head: ``[H, Dv]``.

De-rotation: RoPE rotates keys by their absolute position before they enter the state, so one fact
stored at two positions gives rotated states. ``derotate_states`` multiplies the key axis by the inverse
rotation of the read position ``t`` (``R(t)^T S_t = sum_i gamma^(t-i) R(i-t) k_i v_i^T``): the result
depends only on lags ``t - i``, and an unrotated query ``q`` reads ``q^T (R(t)^T S_t)`` = what the model
reads with its rotated query.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from seqmem_shared.config import choice, integer, validate

REDUCTIONS = ("none", "bilinear", "value_mean")


def derotate_states(states: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``states [..., H, Dk, Dv]`` read at ``positions [...]`` -> ``R(positions)^T states`` (same shape).

    The rotation is fla's non-interleaved RoPE over all ``Dk`` key features with the given ``base``.
    """
    Dk = states.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, Dk, 2, dtype=torch.float32, device=states.device) / Dk))
    angle = -positions.to(states.device).float()[..., None] * inv_freq  # [..., Dk/2]
    cos, sin = angle.cos()[..., None, :, None], angle.sin()[..., None, :, None]  # [..., 1, Dk/2, 1]
    s1, s2 = states.float().chunk(2, dim=-2)
    return torch.cat([s1 * cos - s2 * sin, s1 * sin + s2 * cos], dim=-2).to(states.dtype)


@dataclass
class StateReduction:
    """Callable ``states [..., H, Dk, Dv] -> features [..., H, F]``; fixed by ``seed``."""

    kind: str = "bilinear"
    rank_k: int = 16
    rank_v: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, {"kind": choice(*REDUCTIONS), "rank_k": integer(1), "rank_v": integer(1),
                        "seed": integer(0)})
        self._proj: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def features(self, head_k_dim: int, head_v_dim: int) -> int:
        """F, the number of features per head."""
        return {"none": head_k_dim * head_v_dim, "bilinear": self.rank_k * self.rank_v,
                "value_mean": head_v_dim}[self.kind]

    def _projections(self, Dk: int, Dv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (Dk, Dv, str(device))
        if key not in self._proj:
            g = torch.Generator().manual_seed(self.seed)
            P = torch.randn(Dk, self.rank_k, generator=g) / Dk ** 0.5
            Q = torch.randn(Dv, self.rank_v, generator=g) / Dv ** 0.5
            self._proj[key] = (P.to(device), Q.to(device))
        return self._proj[key]

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        Dk, Dv = states.shape[-2:]
        if self.kind == "none":
            return states.flatten(-2)
        if self.kind == "value_mean":
            return states.mean(-2)
        P, Q = self._projections(Dk, Dv, states.device)
        return torch.einsum("...kv,kr,vs->...rs", states.float(), P, Q).flatten(-2).to(states.dtype)

    def to_dict(self) -> dict:
        return asdict(self)
