"""Triton cross-entropy: the loss and d loss / d logits from two sweeps over each row of logits.

One program owns one row of ``V`` logits at a time. Sweep 1 reads the row once and keeps, per lane, a
running maximum and sum of ``exp(x - max)`` (one exponential per element, no cross-warp reduction
inside the loop) and the sum of the logits (for label smoothing); with the target logit this gives the
loss. Sweep 2 goes over the row again, in reverse order so that the bytes read last, still in L2, come
first, and writes the gradient

    d loss / d x_c = scale * (softmax(x)_c - (1 - eps) * [c == target] - eps / V)

(``scale`` = 1 / non-ignored rows for ``"mean"``). Since ``loss.backward()`` needs this gradient anyway,
the forward writes it; the backward multiplies it in place by ``grad_output`` with a kernel that reads
``grad_output`` on the device and returns at once when it is 1 (no host sync, graph-capturable).
HBM traffic for ``N`` rows of ``b``-byte logits, forward + backward with ``grad_output == 1``:

    read N V b (sweep 1) + write N V b (gradient) + the sweep-2 re-read, which costs nothing where it
    hits L2 and N V b where it misses. The floor is 2 N V b.

``reduction="none"`` cannot precompute the gradient (its ``grad_output`` is per row): its forward only
runs sweep 1 and saves the log-sum-exp, its backward runs sweep 2 alone (read + write, 2 N V b).

Rows of odd length (V = 50257) start at addresses that are not 16-byte aligned: both sweeps move the
row's aligned interior in whole 16-byte vectors (unmasked except in the last partial tile) and the
< 16 bytes at each end element by element.

``linear_cross_entropy`` runs, per chunk of tokens, ``logits = h @ W.T (+ b)`` with cuBLAS (W padded with
zero rows to a multiple of 64, so that every GEMM is aligned whatever V), the kernel above with the
gradient written over the logits, then ``grad_h = dlogits @ W`` and ``grad_W += dlogits.T @ h`` (float32
accumulator): the chunk buffer is the only ``V``-sized activation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import chunk_rows, matmul_dtype

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_BIG = tl.constexpr(-3.0e38)  # finite "minus infinity": keeps x - m free of (-inf) - (-inf)


@triton.jit
def _interior(base, V, VEC: tl.constexpr):
    """[lo, hi): the part of the row [base, base + V) made of whole aligned VEC-element vectors."""
    lo = tl.multiple_of(((base + VEC - 1) // VEC) * VEC, VEC)
    hi = tl.multiple_of(tl.maximum(((base + V) // VEC) * VEC, lo), VEC)
    return lo, hi


@triton.jit
def _edges(base, V, lo, hi, VEC: tl.constexpr):
    """Offsets and mask of the row's < VEC elements before ``lo`` and < VEC after ``hi``."""
    j = tl.arange(0, 2 * VEC)
    offs = tl.where(j < VEC, base + j, hi + j - VEC)
    return offs, offs < tl.where(j < VEC, tl.minimum(lo, base + V), base + V)


@triton.jit
def _online_softmax(x, m, s):
    """Per-lane running max ``m`` and sum ``s`` of exp(x - m), one exponential per element."""
    d = x - m
    e = tl.exp2(-tl.abs(d) * _LOG2E)
    return tl.maximum(m, x), tl.where(d > 0, s * e + 1.0, s + e)


@triton.jit
def _row_stats(logits_ptr, base, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr, NUM_STAGES: tl.constexpr,
               KEEP: tl.constexpr):
    """(log-sum-exp, sum) of the row at elements [base, base + V), loaded with eviction policy KEEP."""
    cols = tl.arange(0, BLOCK_V)
    lo, hi = _interior(base, V, VEC)
    m = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)
    n_full = (hi - lo) // BLOCK_V
    for k in tl.range(n_full, num_stages=NUM_STAGES):  # whole tiles: unmasked vector loads
        x = tl.load(logits_ptr + lo + k * BLOCK_V + cols, eviction_policy=KEEP).to(tl.float32)
        m, s = _online_softmax(x, m, s)
        sx += x
    offs = lo + n_full * BLOCK_V + cols  # the partial tile
    x = tl.load(logits_ptr + offs, mask=offs < hi, other=float("-inf"), eviction_policy=KEEP).to(tl.float32)
    m, s = _online_softmax(x, m, s)
    sx += tl.where(offs < hi, x, 0.0)
    offs, mask = _edges(base, V, lo, hi, VEC)
    xe = tl.load(logits_ptr + offs, mask=mask, other=float("-inf"), eviction_policy=KEEP).to(tl.float32)
    m_row = tl.maximum(tl.max(m, 0), tl.max(xe, 0))
    total = tl.sum(s * tl.exp2((m - m_row) * _LOG2E), 0) + tl.sum(tl.exp2((xe - m_row) * _LOG2E), 0)
    sum_x = tl.sum(sx, 0) + tl.sum(tl.where(mask, xe, 0.0), 0)
    return m_row + tl.log2(total) * _LN2, sum_x


@triton.jit
def _grad(x, lse2, scale, uniform):
    """scale * softmax(x) - eps / V * scale; the target column gets its -(1 - eps) * scale apart."""
    return tl.exp2(x * _LOG2E - lse2) * scale - uniform


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, target_ptr, loss_ptr, lse_ptr, scale_ptr,
    scale_stride, N, V, stride, ignore_index, label_smoothing,
    COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    NUM_STAGES: tl.constexpr, KEEP: tl.constexpr, DROP: tl.constexpr,
):
    """Rows ``pid, pid + programs, ...`` of logits ``[N, V]`` with row stride ``stride`` (the gradient's
    too): the loss and log-sum-exp (COMPUTE_STATS; else the log-sum-exp is read from ``lse_ptr``) and
    the gradient times the row's scale into ``grad_ptr`` (WRITE_GRAD; it may be ``logits_ptr``). Ignored
    rows read nothing and get loss 0 and gradient 0; an out-of-range target gives a NaN loss and no
    one-hot term. Sweep-1 loads use eviction policy KEEP, sweep-2 loads and the stores DROP."""
    cols = tl.arange(0, BLOCK_V)
    first, step = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    for i in range(tl.cdiv(N - first, step)):
        row = first + i * step
        base = row * stride
        target = tl.load(target_ptr + row).to(tl.int64)
        live = target != ignore_index
        hit = live & (target >= 0) & (target < V)
        x_t = tl.load(logits_ptr + base + target, mask=hit, other=float("nan")).to(tl.float32)
        if COMPUTE_STATS:
            lse = tl.full([], 0.0, tl.float32)
            sum_x = tl.full([], 0.0, tl.float32)
            if live:
                lse, sum_x = _row_stats(logits_ptr, base, V, BLOCK_V, VEC, NUM_STAGES, KEEP)
            loss = (1.0 - label_smoothing) * (lse - x_t) + label_smoothing * (lse - sum_x / V)
            tl.store(loss_ptr + row, tl.where(live, loss, 0.0))
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)
        if WRITE_GRAD:
            scale = tl.where(live, tl.load(scale_ptr + row * scale_stride).to(tl.float32), 0.0)
            lse2 = lse * _LOG2E
            uniform = label_smoothing / V * scale
            dtype = grad_ptr.dtype.element_ty
            lo, hi = _interior(base, V, VEC)
            # Edges and the partial tile, then whole tiles from the end: the reverse of sweep 1's
            # order, so the first re-reads find the most recently read bytes in L2.
            offs, mask = _edges(base, V, lo, hi, VEC)
            x = tl.load(logits_ptr + offs, mask=tl.where(live, mask, False), other=0.0,
                        eviction_policy=DROP).to(tl.float32)
            tl.store(grad_ptr + offs, _grad(x, lse2, scale, uniform).to(dtype), mask=mask,
                     eviction_policy=DROP)
            n_full = (hi - lo) // BLOCK_V
            offs = lo + n_full * BLOCK_V + cols
            x = tl.load(logits_ptr + offs, mask=tl.where(live, offs < hi, False), other=0.0,
                        eviction_policy=DROP).to(tl.float32)
            tl.store(grad_ptr + offs, _grad(x, lse2, scale, uniform).to(dtype), mask=offs < hi,
                     eviction_policy=DROP)
            reads = tl.where(live, cols >= 0, False)  # an ignored row reads nothing and stores zeros
            for k in tl.range(n_full, num_stages=NUM_STAGES):
                offs = lo + (n_full - 1 - k) * BLOCK_V + cols
                x = tl.load(logits_ptr + offs, mask=reads, other=0.0, eviction_policy=DROP).to(tl.float32)
                tl.store(grad_ptr + offs, _grad(x, lse2, scale, uniform).to(dtype), eviction_policy=DROP)
            if hit:  # the target column, once every thread's store above is done
                tl.debug_barrier()
                g_t = _grad(x_t, lse2, scale, uniform) - (1.0 - label_smoothing) * scale
                tl.store(grad_ptr + base + target, g_t.to(dtype))


@triton.jit
def _scale_kernel(x_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """``x *= factor`` in place; no memory traffic when ``factor == 1`` (the usual ``loss.backward()``)."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        first, step = tl.program_id(0).to(tl.int64), tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        for i in range(tl.cdiv(tl.cdiv(numel, BLOCK) - first, step)):
            offs = (first + i * step) * BLOCK + cols
            x = tl.load(x_ptr + offs, mask=offs < numel).to(tl.float32)
            tl.store(x_ptr + offs, (x * factor).to(x_ptr.dtype.element_ty), mask=offs < numel)


def _config(vocab_size: int) -> tuple[int, int, int, int | None]:
    """(BLOCK_V, num_warps, num_stages, programs or None for one per row) for rows of ``vocab_size``.

    Timed on an H100 (bench_cross_entropy.py --sweep, 16384 rows of bf16, L2 hints on): V = 8192 best
    with 1024-wide tiles and 4 warps (1.28x the HBM floor), V = 50257 with 4096-wide tiles and 8 warps
    (1.31x); software pipelining (num_stages=3) or a persistent grid only made either slower."""
    if vocab_size <= 16384:
        return min(1024, max(16, triton.next_power_of_2(vocab_size))), 4, 1, None
    return 4096, 8, 1, None


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def scale_in_place(x: torch.Tensor, factor: torch.Tensor) -> None:
    """``x *= factor`` for contiguous ``x`` and a one-element ``factor`` on its device; no host sync."""
    block = 4096
    grid = max(1, min(triton.cdiv(x.numel(), block), 8 * _processors(x.device)))
    _scale_kernel[(grid,)](x, factor, x.numel(), BLOCK=block, num_warps=8)


def launch(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    lse: torch.Tensor,
    loss: torch.Tensor | None,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
    l2_hints: bool = True,
) -> None:
    """Run the kernel on ``logits [N, V]`` (unit column stride) and ``target [N]``.

    ``loss [N]`` given: compute the per-row loss and write ``lse [N]``; else read ``lse``.
    ``grad [N, V]`` given (strides of ``logits``; it may be ``logits``): write the gradient times ``scale``
    (float32, a single value or one per row). ``block_v``, ``num_warps``, ``num_stages`` and ``programs``
    (a grid smaller than N makes each program loop over rows) override the defaults of :func:`_config`;
    ``l2_hints`` asks L2 to keep sweep 1's reads (re-read by sweep 2) and to evict sweep 2's first.
    """
    n_rows, vocab_size = logits.shape
    if n_rows == 0:
        return
    if logits.stride(1) != 1 or (grad is not None and grad.stride() != logits.stride()):
        raise ValueError(f"logits: expected unit column stride (and grad with the same strides), "
                         f"got strides {logits.stride()}")
    block, warps, stages, grid = _config(vocab_size)
    block, warps = block_v or block, num_warps or warps
    stages, grid = num_stages or stages, programs or grid or n_rows
    aligned = logits.data_ptr() % 16 == 0 and (grad is None or grad.data_ptr() % 16 == 0)
    vec = 16 // logits.element_size() if aligned else 1
    if block < vec:
        raise ValueError(f"block_v={block}: must be at least {vec} for {logits.dtype} logits")
    scale_stride = 0 if scale is None or scale.numel() == 1 else scale.stride(0)
    _cross_entropy_kernel[(min(grid, n_rows),)](
        logits, logits if grad is None else grad, target, lse if loss is None else loss, lse,
        lse if scale is None else scale, scale_stride, n_rows, vocab_size, logits.stride(0), ignore_index,
        float(label_smoothing), COMPUTE_STATS=loss is not None, WRITE_GRAD=grad is not None,
        BLOCK_V=block, VEC=vec, NUM_STAGES=stages, KEEP="evict_last" if l2_hints else "",
        DROP="evict_first" if l2_hints else "", num_warps=warps,
    )


def _grad_scale(target: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of non-ignored rows, gradient scale for ``reduction``), both on the device, no sync."""
    n_valid = (target != ignore_index).sum()
    if reduction == "mean":
        return n_valid, n_valid.to(torch.float32).reciprocal()
    return n_valid, torch.ones((), dtype=torch.float32, device=target.device)


def _reduce(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid if reduction == "mean" else total


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, ignore_index, reduction, inplace_backward, block_v):
        logits, target = logits.contiguous(), target.contiguous()
        n_rows = logits.shape[0]
        loss_rows = logits.new_empty(n_rows, dtype=torch.float32)
        lse = torch.empty_like(loss_rows)
        n_valid, scale = _grad_scale(target, ignore_index, reduction)
        ctx.args = (label_smoothing, ignore_index, block_v, inplace_backward)
        ctx.precomputed = ctx.needs_input_grad[0] and reduction != "none"
        if ctx.precomputed:
            # detach(): the same storage under another tensor, which autograd may hand to a leaf's .grad
            grad = logits.detach() if inplace_backward else torch.empty_like(logits)
            launch(logits, target, lse=lse, loss=loss_rows, grad=grad, scale=scale,
                   label_smoothing=label_smoothing, ignore_index=ignore_index, block_v=block_v)
            if inplace_backward:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad)
        else:
            launch(logits, target, lse=lse, loss=loss_rows, grad=None, scale=None,
                   label_smoothing=label_smoothing, ignore_index=ignore_index, block_v=block_v)
            ctx.save_for_backward(logits, target, lse)
        return _reduce(loss_rows, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        label_smoothing, ignore_index, block_v, inplace_backward = ctx.args
        if ctx.precomputed:
            (grad,) = ctx.saved_tensors
            scale_in_place(grad, grad_output.float())
            # A second backward through a retained graph would scale twice: make autograd refuse it.
            torch.autograd.graph.increment_version(grad)
            return grad, None, None, None, None, None, None
        logits, target, lse = ctx.saved_tensors
        grad = logits.detach() if inplace_backward else torch.empty_like(logits)
        launch(logits, target, lse=lse, loss=None, grad=grad, scale=grad_output.float().contiguous(),
               label_smoothing=label_smoothing, ignore_index=ignore_index, block_v=block_v)
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton ``F.cross_entropy`` of logits ``[N, V]`` and ``target [N]``; float32 loss.

    ``inplace_backward=True`` writes the gradient over ``logits`` (saving an ``[N, V]`` buffer); the values
    of ``logits`` are then gone, so use it only when nothing else reads them (e.g. the output of a
    linear layer, whose backward needs its input, not its output). ``block_v`` overrides the vocabulary
    tile (tests use small tiles to run the multi-tile loops).
    """
    return _CrossEntropy.apply(logits, target, float(label_smoothing), int(ignore_index), reduction,
                               inplace_backward, block_v)


def _has_out_dtype_addmm() -> bool:
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` and ``a``, ``b`` in the matmul dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _has_out_dtype_addmm():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, label_smoothing, ignore_index, reduction, chunk_size,
                block_v):
        dtype = matmul_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            target = target.contiguous()
            n_rows = hidden.shape[0]
            n_valid, scale = _grad_scale(target, ignore_index, reduction)
            needs = ctx.needs_input_grad[:3]
            ctx.precomputed = any(needs) and reduction != "none"
            ctx.args = (label_smoothing, ignore_index, chunk_size, block_v, dtype)
            ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            loss_rows = hidden.new_empty(n_rows, dtype=torch.float32)
            lse = torch.empty_like(loss_rows)
            grads = _project_chunks(hidden, weight, bias, target, needs if ctx.precomputed else (False,) * 3,
                                    dtype, chunk_size, block_v, label_smoothing, ignore_index,
                                    lse=lse, loss=loss_rows, scale=scale)
            if ctx.precomputed:
                ctx.save_for_backward(*grads)
            else:
                ctx.save_for_backward(hidden, weight, bias, target, lse)
            return _reduce(loss_rows, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        label_smoothing, ignore_index, chunk_size, block_v, dtype = ctx.args
        with torch.autocast(grad_output.device.type, enabled=False):
            if ctx.precomputed:
                grads = ctx.saved_tensors
            else:
                hidden, weight, bias, target, lse = ctx.saved_tensors
                grads = _project_chunks(hidden, weight, bias, target, ctx.needs_input_grad[:3], dtype,
                                        chunk_size, block_v, label_smoothing, ignore_index, lse=lse,
                                        loss=None, scale=grad_output.float().contiguous())
                grad_output = None
            out = []
            for g, like in zip(grads, ctx.input_dtypes):
                if g is None:
                    out.append(None)
                elif grad_output is None:
                    out.append(g.to(like))
                else:
                    scaled = torch.empty(g.shape, dtype=like, device=g.device)
                    out.append(torch.mul(g, grad_output, out=scaled))
        return (*out, None, None, None, None, None, None)


def _project_chunks(hidden, weight, bias, target, needs, dtype, chunk_size, block_v, label_smoothing,
                    ignore_index, *, lse, loss, scale):
    """Per chunk of tokens: logits = h W^T + b, the kernel (gradient over the logits when any of
    ``needs`` = (hidden, weight, bias) wants one), then the chunk's share of the three gradients.

    Returns (grad_hidden in ``dtype``, grad_weight float32, grad_bias float32), None where not needed.
    """
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    # W (and b) padded with zero rows to a multiple of 64: every GEMM dimension and row stride is then
    # aligned (cuBLAS runs several times slower for V = 50257), the padded logits are exactly 0, and so
    # are their "gradients", which the kernel leaves alone.
    padded = triton.cdiv(vocab_size, 64) * 64
    h, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if padded != vocab_size:
        w = F.pad(w, (0, 0, 0, padded - vocab_size))
        b = None if b is None else F.pad(b, (0, padded - vocab_size))
    need_h, need_w, need_b = needs
    need_b = need_b and b is not None
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    grad_b = torch.zeros(padded, dtype=torch.float32, device=w.device) if need_b else None
    step = chunk_rows(n_rows, vocab_size, chunk_size)
    buffer = torch.empty(step, padded, dtype=dtype, device=h.device)
    write_grad = need_h or need_w or need_b
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        logits = buffer[: stop - start]
        if b is None:
            torch.mm(h[start:stop], w.t(), out=logits)
        else:
            torch.addmm(b, h[start:stop], w.t(), out=logits)
        launch(logits[:, :vocab_size], target[start:stop], lse=lse[start:stop],
               loss=None if loss is None else loss[start:stop],
               grad=logits[:, :vocab_size] if write_grad else None,
               scale=None if scale is None else (scale if scale.numel() == 1 else scale[start:stop]),
               label_smoothing=label_smoothing, ignore_index=ignore_index, block_v=block_v)
        if grad_h is not None:
            torch.mm(logits, w, out=grad_h[start:stop])
        if grad_w is not None:
            _accumulate(grad_w, logits.t(), h[start:stop])
        if grad_b is not None:
            grad_b += logits.sum(0, dtype=torch.float32)
    return (grad_h, None if grad_w is None else grad_w[:vocab_size],
            None if grad_b is None else grad_b[:vocab_size])


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton-backed ``cross_entropy(hidden @ weight.T + bias, target)``; only ``[chunk_size, V]`` logits
    (see :func:`~.reference.chunk_rows`) ever exist. Gradients of ``"mean"``/``"sum"`` are computed in the
    forward; ``"none"`` recomputes the logits chunk by chunk in the backward."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, float(label_smoothing), int(ignore_index),
                                     reduction, chunk_size, block_v)
