"""Rotary position embedding (rotate-half pairs ``(i, i + D/2)``), with the relative-offset property
``<R_i q, R_j k> = <q, R_{j-i} k>`` that the circuit analysis relies on."""

from __future__ import annotations

import torch
from torch import nn


def rope_angles(positions: torch.Tensor, d_head: int, base: float) -> torch.Tensor:
    """[..., D/2] angles ``pos * base^(-2i/D)`` (float64 for exact tables)."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    return positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], cos/sin [T, D/2] -> rotated x."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_matrix(offsets: torch.Tensor, d_head: int, base: float) -> torch.Tensor:
    """[..., D, D] matrices ``R`` with ``apply_rope(x) = R @ x`` at position ``offsets``."""
    ang = rope_angles(offsets, d_head, base)
    c, s = ang.cos(), ang.sin()
    half = d_head // 2
    r = torch.zeros(*ang.shape[:-1], d_head, d_head, dtype=torch.float64, device=ang.device)
    idx = torch.arange(half, device=ang.device)
    r[..., idx, idx] = c
    r[..., idx + half, idx + half] = c
    r[..., idx, idx + half] = -s
    r[..., idx + half, idx] = s
    return r


class Rotary(nn.Module):
    """cos/sin tables for ``n_ctx`` positions (rebuilt on the fly for longer inputs)."""

    def __init__(self, d_head: int, n_ctx: int, base: float = 10000.0) -> None:
        super().__init__()
        self.d_head, self.base = d_head, base
        ang = rope_angles(torch.arange(n_ctx), d_head, base)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def tables(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if t <= self.cos.shape[0] and dtype != torch.float64:
            return self.cos[:t], self.sin[:t]
        ang = rope_angles(torch.arange(t, device=self.cos.device), self.d_head, self.base)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables(x.shape[1], x.dtype)
        return apply_rope(x, cos, sin)
