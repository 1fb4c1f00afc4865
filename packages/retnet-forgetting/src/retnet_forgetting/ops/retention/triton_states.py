"""Triton kernel: retention states at arbitrary positions from chunk-entry states (in-chunk correction).

For each requested ``(b, t)`` and head: ``S_t = gamma^(t-s+1) h[b, t // C] + sum_{i=s..t} gamma^(t-i)
k_i^T v_i`` with ``s = C * (t // C)``, one program per (position, head, ``[BK, BV]`` tile): the chunk's
keys and values are read once, weighted in fp32 and contracted with ``tl.dot`` (fp32, IEEE), and the
result is written in the output dtype. No gathered copies of k/v or h are materialized. The reference is
``reference.states_at_positions``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _states_at_positions_kernel(k, v, h, pos, log_g, out, T, NC, K_POS, H: tl.constexpr, DK: tl.constexpr,
                                DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_pos = tl.program_id(0).to(tl.int64)  # flat index b * K_POS + j
    i_h = tl.program_id(1)
    i_kv = tl.program_id(2)
    NV = tl.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    b = i_pos // K_POS
    t = tl.load(pos + i_pos).to(tl.int64)
    start = (t // C) * C
    lg = tl.load(log_g + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_h = h + (((b * NC + t // C) * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
    carry = tl.exp((t - start + 1).to(tl.float32) * lg)
    acc = tl.load(p_h, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32) * carry
    idx = start + tl.arange(0, C)
    m_c = idx <= t  # also keeps idx < T
    w = tl.where(m_c, tl.exp((t - idx).to(tl.float32) * lg), 0.0)
    p_k = k + ((b * T + idx[:, None]) * H + i_h) * DK + o_k[None, :]
    p_v = v + ((b * T + idx[:, None]) * H + i_h) * DV + o_v[None, :]
    b_k = tl.load(p_k, mask=m_c[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    acc += tl.dot(tl.trans(b_k * w[:, None]), b_v, input_precision="ieee")
    p_o = out + ((i_pos * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
    tl.store(p_o, acc.to(out.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


def states_at_positions_triton(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, h: torch.Tensor,
                               log_gamma: torch.Tensor, chunk_size: int,
                               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``positions [B, K]`` (int64), ``h [B, NC, H, Dk, Dv]``
    chunk-entry states, ``log_gamma [H]`` -> ``[B, K, H, Dk, Dv]`` in ``out_dtype``."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    K_POS = positions.shape[1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or DK < 16 or DV < 16:
        raise ValueError(f"chunk_size={chunk_size}, Dk={DK}, Dv={DV}: the Triton kernel needs a power-of-two "
                         "chunk size >= 16 and head dims >= 16")
    k, v, h = k.contiguous(), v.contiguous(), h.contiguous()
    out = torch.empty(B, K_POS, H, DK, DV, device=k.device, dtype=out_dtype)
    BK = min(64, triton.next_power_of_2(DK))
    BV = min(64, triton.next_power_of_2(DV))
    grid = (B * K_POS, H, triton.cdiv(DK, BK) * triton.cdiv(DV, BV))
    _states_at_positions_kernel[grid](k, v, h, positions.contiguous(), log_gamma.float().contiguous(), out, T,
                                      h.shape[1], K_POS, H=H, DK=DK, DV=DV, C=chunk_size, BK=BK, BV=BV)
    return out
