"""Triton kernel: retention states at arbitrary positions from chunk-entry states (in-chunk correction).

For each requested ``(b, t)`` and head: ``S_t = gamma^(t-s+1) h[b, t // C] + sum_{i=s..t} gamma^(t-i)
k_i^T v_i`` with ``s = C * (t // C)``. One program per (``BP`` positions, head, ``[BK, BV]`` tile) on a flat
grid (tiles fastest, so the programs of one position share its chunk's keys and values in L2); per position
it loads
``k^T [BK, C]`` and the decay-weighted ``v [C, BV]`` once, contracts them with one ``tl.dot`` accumulated
in fp32 on top of the carried chunk-entry state, and writes the output dtype straight into the
``[B, K, H, Dk, Dv]`` result. ``precision="fast"``: tensor-core dot in the inputs' dtype (the weighted
values are rounded to it, as fla's ``chunk_fwd_h`` does); ``"ieee"``: fp32 operands, IEEE fp32 dot (the
mode the exactness tests use). Triton's CPU interpreter computes bf16 dots wrongly (seen with Triton 3.9),
so under ``TRITON_INTERPRET=1`` the fast mode keeps its rounding of the operands but multiplies in fp32.
The reference is ``reference.states_at_positions``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from seqmem_shared.backends import interpret_mode

PRECISIONS = ("auto", "fast", "ieee")


@triton.jit
def _states_at_positions_kernel(k, v, h, pos, log_g, out, T, NC, K_POS, N_POS, H: tl.constexpr,
                                DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, BP: tl.constexpr, ROUND: tl.constexpr,
                                F32_DOT: tl.constexpr):
    NV: tl.constexpr = (DV + BV - 1) // BV
    NKV: tl.constexpr = ((DK + BK - 1) // BK) * NV
    pid = tl.program_id(0).to(tl.int64)
    i_kv = pid % NKV
    i_h = (pid // NKV) % H
    i_grp = pid // (NKV * H)  # positions i_grp * BP ... (flat index b * K_POS + j)
    i_k, i_v = i_kv // NV, i_kv % NV
    lg = tl.load(log_g + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    for j in tl.static_range(BP):
        i_pos = tl.minimum(i_grp * BP + j, N_POS - 1)  # the last group repeats its last position
        b = i_pos // K_POS
        t = tl.load(pos + i_pos).to(tl.int64)
        chunk = t // C
        start = chunk * C
        p_h = h + ((b * NC + chunk) * H + i_h) * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
        carry = tl.exp((t - start + 1).to(tl.float32) * lg)
        acc = tl.load(p_h, mask=m_kv, other=0.0).to(tl.float32) * carry
        idx = start + tl.arange(0, C)
        m_c = idx <= t  # also keeps idx < T
        w = tl.where(m_c, tl.exp((t - idx).to(tl.float32) * lg), 0.0)
        p_kt = k + ((b * T + idx[None, :]) * H + i_h) * DK + o_k[:, None]  # k^T tile [BK, C]
        p_v = v + ((b * T + idx[:, None]) * H + i_h) * DV + o_v[None, :]  # [C, BV]
        b_kt = tl.load(p_kt, mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_vw = tl.load(p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32) * w[:, None]
        if ROUND:  # tensor-core operands in the inputs' dtype
            b_vw = b_vw.to(b_kt.dtype)
        if F32_DOT:
            acc += tl.dot(b_kt.to(tl.float32), b_vw.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(b_kt, b_vw, acc)
        p_o = out + ((i_pos * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
        tl.store(p_o, acc.to(out.dtype.element_ty), mask=m_kv)


def states_at_positions_triton(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, h: torch.Tensor,
                               log_gamma: torch.Tensor, chunk_size: int,
                               out_dtype: torch.dtype = torch.float32, precision: str = "auto",
                               block_k: int = 64, block_v: int = 128, num_warps: int = 4,
                               block_p: int = 1) -> torch.Tensor:
    """``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``positions [B, K]`` (int64, in range: not checked here),
    ``h [B, NC, H, Dk, Dv]`` chunk-entry states (any float dtype), ``log_gamma [H]`` -> ``[B, K, H, Dk, Dv]``
    in ``out_dtype``. ``precision``: ``"auto"`` (``"ieee"`` for fp32 inputs, else ``"fast"``), ``"fast"``,
    ``"ieee"``; ``block_k``/``block_v``/``num_warps``: the tile of one program, ``block_p``: positions per
    program (one after the other)."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    K_POS = positions.shape[1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or DK < 16 or DV < 16:
        raise ValueError(f"chunk_size={chunk_size}, Dk={DK}, Dv={DV}: the Triton kernel needs a power-of-two "
                         "chunk size >= 16 and head dims >= 16")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    ieee = precision == "ieee" or (precision == "auto" and k.dtype == torch.float32)
    k, v, h = k.contiguous(), v.contiguous(), h.contiguous()
    out = torch.empty(B, K_POS, H, DK, DV, device=k.device, dtype=out_dtype)
    BK = max(16, min(block_k, triton.next_power_of_2(DK)))
    BV = max(16, min(block_v, triton.next_power_of_2(DV)))
    n_pos = B * K_POS
    grid = (triton.cdiv(n_pos, block_p) * H * triton.cdiv(DK, BK) * triton.cdiv(DV, BV),)
    if n_pos:
        _states_at_positions_kernel[grid](k, v, h, positions.contiguous(), log_gamma.float().contiguous(),
                                          out, T, h.shape[1], K_POS, n_pos, H=H, DK=DK, DV=DV, C=chunk_size,
                                          BK=BK, BV=BV, BP=block_p, ROUND=not ieee,
                                          F32_DOT=ieee or interpret_mode(), num_warps=num_warps)
    return out
