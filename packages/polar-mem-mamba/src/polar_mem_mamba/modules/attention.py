"""Attention blocks: RoPE, pre-norm self-attention (bidirectional or causal), GSA cross-attention."""

from __future__ import annotations

import torch
from einops import rearrange
from seqmem_shared.kernels import RMSNorm
from torch import nn

from polar_mem_mamba.ops.attention import attention


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on the first ``rotary_dim`` channels of x [B, L, H, D] (half-split pairs).

    The remaining ``D - rotary_dim`` channels stay position-free (partial rotary), so attention can match
    on content alone through them. ``positions`` [L] are integer positions.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [L, half]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2, rest = x[..., :half].float(), x[..., half:rotary_dim].float(), x[..., rotary_dim:]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with RoPE and a residual: ``x + out(attn(norm(x)))``.

    ``causal=False`` is the encoder's bidirectional attention, ``causal=True`` the decoder's.
    x [B, L, d_model] -> [B, L, d_model].
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool, rotary_fraction: float = 0.5,
                 dropout: float = 0.0, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_heads, self.causal, self.dropout, self.backend = n_heads, causal, dropout, backend
        head_dim = d_model // n_heads
        self.rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
        self.norm = RMSNorm(d_model, backend=backend, **factory)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, **factory)
        self.out = nn.Linear(d_model, d_model, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b l (three h d) -> three b l h d", three=3, h=self.n_heads)
        pos = torch.arange(x.shape[1], device=x.device)
        q, k = rotate(q, pos, self.rotary_dim), rotate(k, pos, self.rotary_dim)
        y = attention(q, k, v, causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
                      backend=self.backend)
        return x + self.out(rearrange(y, "b l h d -> b l (h d)"))


class GatedShortcutAttention(nn.Module):
    """GSA: cross-attention from ``[decoder hidden, initial embeddings]`` to the encoder output.

    The query stream concatenates the current hidden state with the decoder's initial embeddings (the
    shortcut: the raw query token stays visible however deep the layer), is RMS-normed and projected to
    ``n_heads`` heads; keys/values come from ``encoder_out``. RoPE uses decoder positions for queries and
    encoder positions for keys (partial rotary). The result enters the residual through a sigmoid gate:
    ``x + sigmoid(gate(q_in)) * out(attn)``. x, x0 [B, L, d_model], encoder_out [B, S, d_model].
    """

    def __init__(self, d_model: int, n_heads: int, rotary_fraction: float = 0.5, dropout: float = 0.0,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_heads, self.dropout, self.backend = n_heads, dropout, backend
        self.rotary_dim = int(d_model // n_heads * rotary_fraction) // 2 * 2
        self.norm = RMSNorm(2 * d_model, backend=backend, **factory)
        self.kv_norm = RMSNorm(d_model, backend=backend, **factory)
        self.q_proj = nn.Linear(2 * d_model, d_model, bias=False, **factory)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False, **factory)
        self.out = nn.Linear(d_model, d_model, bias=False, **factory)
        self.gate = nn.Linear(2 * d_model, d_model, bias=True, **factory)
        nn.init.zeros_(self.out.weight)  # starts as the identity; training opens the cross-attention

    def forward(self, x: torch.Tensor, x0: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.cat([x, x0], dim=-1))
        q = rearrange(self.q_proj(h), "b l (h d) -> b l h d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(self.kv_norm(encoder_out)), "b s (two h d) -> two b s h d", two=2,
                         h=self.n_heads)
        q = rotate(q, torch.arange(x.shape[1], device=x.device), self.rotary_dim)
        k = rotate(k, torch.arange(k.shape[1], device=x.device), self.rotary_dim)
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return x + torch.sigmoid(self.gate(h)) * self.out(rearrange(y, "b l h d -> b l (h d)"))
