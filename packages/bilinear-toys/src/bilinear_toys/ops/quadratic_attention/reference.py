"""The oracle: causal quadratic attention in its O(N^2) masked form.

``z[b, i, h] = sum_{j <= i} (scale * q[b, i, h] . k[b, j, h])^2 * v[b, j, h]``: no softmax, no
normalization. Every other form in this package must equal it.
"""

from __future__ import annotations

import torch
from einops import einsum


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [t_q, t_k], True where key j <= query i (queries are the last t_q of the t_k positions)."""
    i = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return torch.arange(t_k, device=device)[None, :] <= i


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q . k``: q [B, Tq, H, D], k [B, Tk, H, D] -> [B, H, Tq, Tk] (unmasked, unsquared)."""
    return einsum(q, k, "b i h d, b j h d -> b h i j") * scale


def quadratic_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: float | None = None) -> torch.Tensor:
    """q, k [B, T, H, D], v [B, T, H, Dv] -> z [B, T, H, Dv]; ``scale`` defaults to ``1 / D``."""
    scale = 1.0 / q.shape[-1] if scale is None else scale
    scores = attention_scores(q, k, scale)
    pattern = scores.square() * causal_mask(q.shape[1], k.shape[1], q.device)
    return einsum(pattern, v, "b h i j, b j h e -> b i h e")
