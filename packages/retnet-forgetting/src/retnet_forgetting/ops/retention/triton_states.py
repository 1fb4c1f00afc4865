"""Triton kernel: retention states at arbitrary positions from chunk-entry states (in-chunk correction).

For each requested ``(b, t)`` and head: ``S_t = gamma^(t-s+1) h[b, t // C] + sum_{i=s..t} gamma^(t-i)
k_i^T v_i`` with ``s = C * (t // C)``. Requested positions are grouped on the host by (row, chunk), at most
``max_group`` per group (:func:`position_groups`). One program per (group, head, ``[BK, BV]`` tile), tiles
fastest on a flat grid: it loads the chunk-entry state tile, ``k^T [BK, C]`` and ``v [C, BV]`` of the
chunk ONCE, then per position of its group weights the values by the decay, contracts with one ``tl.dot``
accumulated in fp32 on top of the carried entry state, and writes the output dtype straight into the
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

from retnet_forgetting.ops.retention.positions import PositionGroups, position_groups

PRECISIONS = ("auto", "fast", "ieee")


@triton.jit
def _states_at_positions_kernel(k, v, h, pos, order, first, count, log_g, out, T, NC, K_POS,
                                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr, ROUND: tl.constexpr,
                                F32_DOT: tl.constexpr):
    NV: tl.constexpr = (DV + BV - 1) // BV
    NKV: tl.constexpr = ((DK + BK - 1) // BK) * NV
    pid = tl.program_id(0).to(tl.int64)
    i_kv = pid % NKV
    i_h = (pid // NKV) % H
    i_g = pid // (NKV * H)
    i_k, i_v = i_kv // NV, i_kv % NV
    g0 = tl.load(first + i_g)
    n = tl.load(count + i_g)
    i_first = tl.load(order + g0)  # flat index b * K_POS + j
    b = i_first // K_POS
    start = (tl.load(pos + i_first) // C) * C
    t_last = tl.load(pos + tl.load(order + g0 + n - 1))  # positions of a group are sorted
    lg = tl.load(log_g + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    idx = start + tl.arange(0, C)
    m_c = idx <= t_last  # also keeps idx < T
    p_h = h + ((b * NC + start // C) * H + i_h) * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    p_kt = k + ((b * T + idx[None, :]) * H + i_h) * DK + o_k[:, None]  # k^T tile [BK, C]
    p_v = v + ((b * T + idx[:, None]) * H + i_h) * DV + o_v[None, :]  # [C, BV]
    b_h = tl.load(p_h, mask=m_kv, other=0.0)
    b_kt = tl.load(p_kt, mask=m_k[:, None] & m_c[None, :], other=0.0)
    b_v = tl.load(p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    if F32_DOT:
        b_kt = b_kt.to(tl.float32)
    for j in tl.static_range(P):
        if j < n:
            i_pos = tl.load(order + g0 + j)
            t = tl.load(pos + i_pos)
            acc = b_h.to(tl.float32) * tl.exp((t - start + 1).to(tl.float32) * lg)
            w = tl.where(idx <= t, tl.exp((t - idx).to(tl.float32) * lg), 0.0)
            b_vw = b_v * w[:, None]
            if ROUND:  # tensor-core operands in the inputs' dtype
                b_vw = b_vw.to(k.dtype.element_ty)
            if F32_DOT:
                acc += tl.dot(b_kt, b_vw.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(b_kt, b_vw, acc)
            p_o = out + ((i_pos * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
            tl.store(p_o, acc.to(out.dtype.element_ty), mask=m_kv)


def states_at_positions_triton(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, h: torch.Tensor,
                               log_gamma: torch.Tensor, chunk_size: int,
                               out_dtype: torch.dtype = torch.float32, precision: str = "auto",
                               groups: PositionGroups | None = None, block_k: int = 64, block_v: int = 64,
                               num_warps: int = 4) -> torch.Tensor:
    """``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``positions [B, K]`` (int64, in range: not checked here),
    ``h [B, NC, H, Dk, Dv]`` chunk-entry states (any float dtype), ``log_gamma [H]`` -> ``[B, K, H, Dk, Dv]``
    in ``out_dtype``. ``precision``: ``"auto"`` (``"ieee"`` for fp32 inputs, else ``"fast"``), ``"fast"``,
    ``"ieee"``. ``groups``: :func:`position_groups` of ``positions`` (made here when None, which reads
    ``positions`` on the host: pass them for device positions). ``block_k``/``block_v``/``num_warps``: the
    tile of one program."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    K_POS = positions.shape[1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or DK < 16 or DV < 16:
        raise ValueError(f"chunk_size={chunk_size}, Dk={DK}, Dv={DV}: the Triton kernel needs a power-of-two "
                         "chunk size >= 16 and head dims >= 16")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    ieee = precision == "ieee" or (precision == "auto" and k.dtype == torch.float32)
    if groups is None:
        groups = position_groups(positions, chunk_size, device=k.device)
    k, v, h = k.contiguous(), v.contiguous(), h.contiguous()
    out = torch.empty(B, K_POS, H, DK, DV, device=k.device, dtype=out_dtype)
    BK = max(16, min(block_k, triton.next_power_of_2(DK)))
    BV = max(16, min(block_v, triton.next_power_of_2(DV)))
    grid = (groups.first.numel() * H * triton.cdiv(DK, BK) * triton.cdiv(DV, BV),)
    positions = positions.to(k.device, non_blocking=True).contiguous()
    if grid[0]:
        _states_at_positions_kernel[grid](
            k, v, h, positions, groups.order, groups.first, groups.count,
            log_gamma.float().contiguous(), out, T, h.shape[1], K_POS, H=H, DK=DK, DV=DV, C=chunk_size, BK=BK,
            BV=BV, P=groups.max_group, ROUND=not ieee, F32_DOT=ieee or interpret_mode(), num_warps=num_warps)
    return out
