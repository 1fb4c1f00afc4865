"""RMSNorm in Triton: forward and backward kernels, optional fused residual add, any hidden size.

Same numerics as ``reference.py`` (float32 arithmetic, outputs cast back). Rows are viewed as a
``[rows, d]`` matrix whose last dim is contiguous.

Two layouts, chosen by the row width ``d``:

* **fused** (``next_pow2(d) <= max_block``): one program holds a ``[BLOCK_R, BLOCK_D]`` tile of whole
  rows, so every pass over the data is a single read. Forward: one tile per program. Backward: a
  persistent grid of ``P`` programs, each walking a contiguous range of rows and summing its share of
  ``dweight`` in registers; a small kernel then sums the ``[P, d]`` float32 partials in a fixed order
  (deterministic, no atomics).
* **split-row** (wider rows): the forward loops over column tiles twice per row (sum of squares, then
  normalize; the second read mostly hits L2). The backward first computes each row's
  ``mean(dy * w * x_hat)`` in a row pass, then a 2-D grid of (row range, column tile) programs writes
  ``dx`` and per-range ``dweight`` partials.

Forward saves ``rstd [rows]`` (float32) and the normalized input (``x``, or ``h = x + residual``).
Backward: ``dx = rstd * (g - x_hat * mean(g * x_hat))`` with ``g = dy * w``, and
``dweight = sum_rows dy * x_hat``; with a residual, the gradient of the returned ``h`` is added to
``dx`` and that sum is the gradient of both ``x`` and ``residual``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import residual_dtype

#: Widest row (elements, a power of two) that one program normalizes in a single pass.
MAX_FUSED_BLOCK = 16384
#: Column tile of the split-row path.
SPLIT_BLOCK = 4096

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_fused_kernel(
    X, RES, W, Y, H, RSTD, n_rows, d, stride_x, stride_r, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows64 * d + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / d + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * d + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_split_kernel(
    X, RES, W, Y, H, RSTD, d, stride_x, stride_r, eps,
    BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    h_row = H + row * d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = cols < d
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(RES + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(h_row + cols, h, mask=ok)
            x = h.to(tl.float32)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / d + eps)
    tl.store(RSTD + row, rstd)
    if HAS_RES:
        tl.debug_barrier()  # make this program's stores of h visible to all of its threads
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = cols < d
        if HAS_RES:
            x = tl.load(h_row + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * d + cols, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_rowdot_kernel(
    H, W, DY, RSTD, ROWDOT, d, stride_h, stride_dy,
    BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
):
    """ROWDOT[row] = mean(dy * w * x_hat) over the row (split-row path)."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = cols < d
        g = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        acc += g * tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    tl.store(ROWDOT + row, tl.sum(acc, axis=0) * rstd / d)


@triton.jit
def _bwd_kernel(
    H, W, DY, DHO, RSTD, ROWDOT, DX, DRES, DWP,
    n_rows, d, rows_per_prog, stride_h, stride_dy, stride_dho,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, HAS_DHO: tl.constexpr,
    STORE_DRES: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (i, j): rows [i * rows_per_prog, (i + 1) * rows_per_prog), columns of tile j.

    Without SPLIT the tile holds whole rows (one column tile) and the row dot is computed here.
    """
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    row_start = pid_r * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat = x_hat * rstd[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            acc += dy * x_hat
        if COMPUTE_DX:
            g = dy
            if HAS_W:  # reloaded per row tile (an L1 hit) rather than held in registers
                g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SPLIT:
                c = tl.load(ROWDOT + rows, mask=row_ok, other=0.0)
            else:
                c = tl.sum(g * x_hat, axis=1) / d
            dx = (g - x_hat * c[:, None]) * rstd[:, None]
            if HAS_DHO:
                dx += tl.load(DHO + rows64 * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64 * d + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if STORE_DRES:
                tl.store(DRES + rows64 * d + cols[None, :], dx.to(DRES.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DWP + pid_r.to(tl.int64) * d + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _dw_reduce_kernel(DWP, DW, n_part, d, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """DW[c] = sum_p DWP[p, c] in float32, in a fixed order (deterministic), cast to DW's dtype."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < n_part)[:, None] & col_ok[None, :]
        acc += tl.load(DWP + parts.to(tl.int64)[:, None] * d + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class Config:
    """Launch shape of one kernel: rows per tile, columns per tile, warps, programs per SM (backward)."""

    block_r: int
    block_d: int
    num_warps: int
    programs_per_sm: int = 1


def _warps(tile: int) -> int:
    """Warps for a tile of ``tile`` elements: 32 elements per thread, 2 to 16 warps."""
    return max(2, min(16, tile // 1024))


@functools.cache
def fwd_config(d: int, max_block: int = MAX_FUSED_BLOCK) -> Config:
    """Default forward launch shape for rows of width ``d`` (tuned on an H100, bf16, 8192 rows)."""
    block_d = triton.next_power_of_2(d)
    if block_d > max_block:
        block_d = min(SPLIT_BLOCK, max_block)
        # 32 warps: few rows in flight per SM, so the second pass over a row mostly hits L2
        return Config(1, block_d, 32 if block_d >= SPLIT_BLOCK else _warps(block_d))
    block_r = max(1, min(16, 2048 // block_d))
    return Config(block_r, block_d, _warps(block_r * block_d))


@functools.cache
def bwd_config(d: int, max_block: int = MAX_FUSED_BLOCK) -> Config:
    """Default backward launch shape for rows of width ``d`` (tuned on an H100, bf16, 8192 rows)."""
    block_d = triton.next_power_of_2(d)
    if block_d > max_block:
        block_d = min(SPLIT_BLOCK, max_block)
        return Config(4, block_d, _warps(4 * block_d), 2)
    block_r = max(1, min(32, 16384 // block_d))
    return Config(block_r, block_d, _warps(block_r * block_d), 1)


@functools.lru_cache(maxsize=256)
def _bwd_grid(n_rows: int, d: int, cfg: Config, n_sms: int) -> tuple[int, int, int]:
    """(row ranges, rows per range, column tiles) of the persistent backward grid."""
    n_col_tiles = triton.cdiv(d, cfg.block_d)
    n_progs = min(max(1, n_sms * cfg.programs_per_sm // n_col_tiles), triton.cdiv(n_rows, cfg.block_r))
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, n_progs), cfg.block_r) * cfg.block_r
    return triton.cdiv(n_rows, rows_per_prog), rows_per_prog, n_col_tiles


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(t: Tensor) -> int:
    return _sm_count(t.device.index or 0) if t.is_cuda else 4  # interpreter: a few programs


def _rows(t: Tensor, d: int) -> tuple[Tensor, int]:
    """``t [..., d]`` as rows with unit column stride, and its row stride (no copy when possible)."""
    if t.is_contiguous():
        return t, d
    t2 = t.reshape(-1, d)
    if t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, residual: Tensor | None = None,
    config: Config | None = None, max_block: int = MAX_FUSED_BLOCK,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Forward on ``x [..., d]``: returns ``y`` and ``h`` (None without residual), both contiguous in
    x's shape, and ``rstd [rows]`` (float32)."""
    d = x.shape[-1]
    n_rows = x.numel() // d
    x, stride_x = _rows(x, d)
    cfg = config or fwd_config(d, max_block)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    h, res, stride_r = None, x, stride_x  # placeholders when unused
    if residual is not None:
        res, stride_r = _rows(residual, d)
        h = torch.empty(x.shape, dtype=residual_dtype(x, residual), device=x.device)
    if n_rows == 0:
        return y, h, rstd
    args = (x, res, weight if weight is not None else x, y, h if h is not None else y, rstd)
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, num_warps=cfg.num_warps)
    if cfg.block_d >= d:
        _fwd_fused_kernel[(triton.cdiv(n_rows, cfg.block_r),)](
            *args, n_rows, d, stride_x, stride_r, eps, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, **flags,
        )
    else:
        _fwd_split_kernel[(n_rows,)](*args, d, stride_x, stride_r, eps, BLOCK_D=cfg.block_d, **flags)
    return y, h, rstd


def rms_norm_bwd(
    dy: Tensor, h: Tensor, weight: Tensor | None, rstd: Tensor, x_dtype: torch.dtype,
    dh_out: Tensor | None = None, res_dtype: torch.dtype | None = None, compute_dx: bool = True,
    compute_dw: bool = True, config: Config | None = None, max_block: int = MAX_FUSED_BLOCK,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward on ``[..., d]`` tensors: ``(dx, dweight, dresidual)``, dx and dresidual in dy's shape.

    ``h`` is the normalized input saved by the forward, ``dh_out`` the gradient of the returned new
    residual (if any) and ``res_dtype`` the residual's dtype (None without a residual). ``dx`` comes in
    ``x_dtype``; ``dresidual`` is the same tensor as ``dx`` when ``res_dtype == x_dtype``. Outputs not
    asked for are None.
    """
    d = h.shape[-1]
    n_rows = h.numel() // d
    dev = h.device
    h, stride_h = _rows(h, d)
    dy, stride_dy = _rows(dy, d)
    cfg = config or bwd_config(d, max_block)
    compute_dw = compute_dw and weight is not None
    split = cfg.block_d < d
    store_dres = compute_dx and res_dtype is not None and res_dtype != x_dtype
    dx = torch.empty(dy.shape, dtype=x_dtype, device=dev) if compute_dx else None
    dres = torch.empty(dy.shape, dtype=res_dtype, device=dev) if store_dres else dx
    if res_dtype is None:
        dres = None
    if n_rows == 0 or not (compute_dx or compute_dw):
        return dx, (torch.zeros_like(weight) if compute_dw else None), dres
    # A persistent grid: program (i, j) walks a contiguous range of rows (a multiple of block_r) in
    # column tile j, so each program writes one row of float32 dweight partials.
    n_progs, rows_per_prog, n_col_tiles = _bwd_grid(n_rows, d, cfg, _num_sms(h))
    dw_part = torch.empty((n_progs, d), dtype=torch.float32, device=dev) if compute_dw else None
    w = weight if weight is not None else h
    rowdot = rstd  # placeholder pointer when unused
    if split and compute_dx:
        rowdot = torch.empty(n_rows, dtype=torch.float32, device=dev)
        block = min(SPLIT_BLOCK, max_block)
        _bwd_rowdot_kernel[(n_rows,)](h, w, dy, rstd, rowdot, d, stride_h, stride_dy,
                                      BLOCK_D=block, HAS_W=weight is not None, num_warps=_warps(block))
    dho, stride_dho = _rows(dh_out, d) if dh_out is not None else (dy, stride_dy)
    _bwd_kernel[(n_progs, n_col_tiles)](
        h, w, dy, dho, rstd, rowdot,
        dx if dx is not None else h, dres if store_dres else h, dw_part if compute_dw else rstd,
        n_rows, d, rows_per_prog, stride_h, stride_dy, stride_dho,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, HAS_W=weight is not None, HAS_DHO=dh_out is not None,
        STORE_DRES=store_dres, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, SPLIT=split,
        num_warps=cfg.num_warps,
    )
    dw = None
    if compute_dw:
        dw = torch.empty_like(weight)
        _dw_reduce_kernel[(triton.cdiv(d, 128),)](dw_part, dw, n_progs, d, BLOCK_P=16, BLOCK_C=128,
                                                  num_warps=4)
    return dx, dw, dres


# --------------------------------------------------------------------------------------------- autograd
class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, weight, residual, eps, max_block)`` -> ``y`` or ``(y, h)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float,
                max_block: int):
        y, h, rstd = rms_norm_fwd(x, weight, eps, residual, max_block=max_block)
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        ctx.shape, ctx.max_block, ctx.x_dtype = x.shape, max_block, x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)  # an unused output gets no gradient tensor
        if y.shape != x.shape:  # x was not contiguous
            y, h = y.view(x.shape), h.view(x.shape) if h is not None else None
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy: Tensor | None, dh_out: Tensor | None = None):
        h, weight, rstd = ctx.saved_tensors
        need_x, need_w, need_r = ctx.needs_input_grad[:3]
        if dy is None:  # y unused: only the new residual carries a gradient
            if dh_out is None:
                return None, None, None, None, None
            return (dh_out.to(ctx.x_dtype) if need_x else None, None,
                    dh_out.to(ctx.res_dtype) if need_r else None, None, None)
        dx, dw, dres = rms_norm_bwd(
            dy, h, weight, rstd, ctx.x_dtype, dh_out, ctx.res_dtype,
            compute_dx=need_x or need_r, compute_dw=need_w, max_block=ctx.max_block,
        )
        if dx is not None and dx.shape != ctx.shape:  # dy was not contiguous
            dx, dres = dx.view(ctx.shape), dres.view(ctx.shape) if dres is not None else None
        return dx if need_x else None, dw, dres if need_r else None, None, None


def rms_norm_triton(
    x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, residual: Tensor | None = None,
    max_block: int = MAX_FUSED_BLOCK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton RMSNorm (see ``reference.rms_norm_reference`` for the semantics).

    ``max_block`` bounds the row width handled in one pass; wider rows take the split-row path
    (tests lower it to exercise that path on small shapes).
    """
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    return RMSNormFunction.apply(x, weight, residual, eps, max_block)
