"""Triton kernel for the linear (state) form of causal quadratic attention (forward).

One program per (batch * head, block of value columns) walks the chunks in order. Per chunk it adds the
masked intra-chunk term ``((Q_c K_c^T) * scale)^2 @ V_c`` and, for every row ``a`` of the state
``S[a] = sum_j k_ja k_j v_j^T`` ([D, BV], kept in an fp32 scratch in global memory that only this program
touches), the inter-chunk term ``scale^2 * (Q_c * Q_c[:, a]) @ S[a]`` before updating ``S[a]`` with the
chunk's keys. Memory O(B H D^2 Dv), no T x T matrix.

The backward pass saves only q, k, v and recomputes the forward in fp32 through
:func:`~bilinear_toys.ops.quadratic_attention.linear.quadratic_attention_chunkwise` (all chunks as batched
matmuls, no Python loop over chunks), then differentiates that: O(T/C D^2 Dv + T D^2) transient memory
per head, still no T x T matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from einops import rearrange

from bilinear_toys.ops.quadratic_attention.linear import quadratic_attention_chunkwise


@triton.jit
def _quadratic_linear_fwd(Q, K, V, Z, S, T, D, DV, scale,
                          CHUNK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BD)
    offs_v = vb * BV + tl.arange(0, BV)
    d_ok = offs_d < D
    v_ok = offs_v < DV
    q_base = Q + bh * T * D
    k_base = K + bh * T * D
    v_base = V + bh * T * DV
    z_base = Z + bh * T * DV
    s_base = S + bh * D * D * DV
    causal = offs_c[:, None] >= offs_c[None, :]
    for start in range(0, T, CHUNK):
        rows = start + offs_c
        r_ok = rows < T
        qc = tl.load(q_base + rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        kc = tl.load(k_base + rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        vc = tl.load(v_base + rows[:, None] * DV + offs_v[None, :], mask=r_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        scores = tl.dot(qc, tl.trans(kc), input_precision="ieee") * scale
        pattern = tl.where(causal, scores * scores, 0.0)
        acc = tl.dot(pattern, vc, input_precision="ieee")
        for a in range(0, D):
            qa = tl.load(q_base + rows * D + a, mask=r_ok, other=0.0).to(tl.float32)
            ka = tl.load(k_base + rows * D + a, mask=r_ok, other=0.0).to(tl.float32)
            s_ptr = s_base + a * D * DV + offs_d[:, None] * DV + offs_v[None, :]
            s_ok = d_ok[:, None] & v_ok[None, :]
            s_a = tl.load(s_ptr, mask=s_ok, other=0.0)
            acc += tl.dot(qc * qa[:, None], s_a, input_precision="ieee") * (scale * scale)
            s_a += tl.dot(tl.trans(kc * ka[:, None]), vc, input_precision="ieee")
            tl.store(s_ptr, s_a, mask=s_ok)
        tl.store(z_base + rows[:, None] * DV + offs_v[None, :], acc.to(Z.dtype.element_ty),
                 mask=r_ok[:, None] & v_ok[None, :])


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             chunk_size: int) -> torch.Tensor:
    b, t, h, d = q.shape
    dv = v.shape[-1]
    qh, kh, vh = (rearrange(x, "b t h d -> (b h) t d").contiguous() for x in (q, k, v))
    z = torch.empty(b * h, t, dv, device=q.device, dtype=q.dtype)
    state = torch.zeros(b * h, d, d, dv, device=q.device, dtype=torch.float32)
    bd = max(16, triton.next_power_of_2(d))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    chunk = max(16, triton.next_power_of_2(chunk_size))
    grid = (b * h, triton.cdiv(dv, bv))
    _quadratic_linear_fwd[grid](qh, kh, vh, z, state, t, d, dv, float(scale), CHUNK=chunk, BD=bd, BV=bv)
    return rearrange(z, "(b h) t e -> b t h e", b=b)


class _QuadraticLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, chunk_size):  # noqa: D401 - autograd signature
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return _forward(q, k, v, scale, chunk_size)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        q, k, v = (x.detach().float().requires_grad_(True) for x in saved)
        with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
            z = quadratic_attention_chunkwise(q, k, v, ctx.scale, ctx.chunk_size)
        grads = torch.autograd.grad(z, (q, k, v), grad.float())
        return (*(g.to(x.dtype) for g, x in zip(grads, saved)), None, None)


def quadratic_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                               chunk_size: int = 64) -> torch.Tensor:
    """Same contract as :func:`quadratic_attention_chunked` (no state in/out); chunks of at least 16."""
    scale = 1.0 / q.shape[-1] if scale is None else scale
    return _QuadraticLinearTriton.apply(q, k, v, scale, chunk_size)
