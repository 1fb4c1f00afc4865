"""Pure-PyTorch cross-entropy: the oracle for the Triton kernels and the CPU path.

``cross_entropy`` is ``F.cross_entropy`` on float32-upcast logits. ``linear_cross_entropy`` computes
``cross_entropy(hidden @ weight.T + bias, target)`` a chunk of tokens at a time: each chunk's
``[chunk, V]`` logits are recomputed in the backward, so neither pass holds the full ``[N, V]`` logits,
on CPU as on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGITS_BUDGET = 1 << 26
"""Default bound on the elements of one chunk of logits in ``linear_cross_entropy`` (128 MiB in bf16)."""


def chunk_rows(n_rows: int, vocab_size: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk of ``linear_cross_entropy``: ``chunk_size``, or the most that keep the chunk's
    ``[chunk, vocab_size]`` logits within ``LOGITS_BUDGET`` elements (a multiple of 128 when that many)."""
    if chunk_size is None:
        chunk_size = max(1, LOGITS_BUDGET // max(vocab_size, 1))
        if chunk_size >= 128:
            chunk_size -= chunk_size % 128
    return max(1, min(chunk_size, n_rows))


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype of the projection ``hidden @ weight.T``: autocast's when it is on, else the promoted one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy`` of logits ``[N, V]`` (any float dtype, computed in at least float32) and
    ``target [N]``.

    Returns a float32 (float64 for float64 logits) loss: a scalar for ``"mean"``/``"sum"``, ``[N]`` for
    ``"none"``. ``inplace_backward`` exists for signature parity with the Triton path and is ignored: the
    reference never writes ``logits``.
    """
    del inplace_backward
    return F.cross_entropy(_at_least_float32(logits), target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                dtype: torch.dtype, label_smoothing: float, ignore_index: int) -> torch.Tensor:
    """Per-row losses ``[chunk]`` of one chunk of tokens."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        return F.cross_entropy(_at_least_float32(logits), target, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="none")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses ``[N]``; the backward recomputes one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, dtype, label_smoothing, ignore_index, step):
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.args = (dtype, label_smoothing, ignore_index, step)
        rows = [_chunk_loss(hidden[i:i + step], weight, bias, target[i:i + step], dtype, label_smoothing,
                            ignore_index) for i in range(0, hidden.shape[0], step)]
        if not rows:
            return hidden.new_zeros(0, dtype=torch.promote_types(dtype, torch.float32))
        return torch.cat(rows)

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, target = ctx.saved_tensors
        dtype, label_smoothing, ignore_index, step = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = [torch.zeros_like(p, dtype=_at_least_float32(p).dtype) if need else None
               for p, need in ((weight, need_w), (bias, need_b and bias is not None))]
        w = weight.detach().requires_grad_(need_w)
        b = None if bias is None else bias.detach().requires_grad_(need_b)
        for i in range(0, hidden.shape[0], step):
            with torch.enable_grad():
                h = hidden[i:i + step].detach().requires_grad_(need_h)
                rows = _chunk_loss(h, w, b, target[i:i + step], dtype, label_smoothing, ignore_index)
                wanted = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need and t is not None]
                grads = list(torch.autograd.grad(rows, wanted, grad_rows[i:i + step]))
            if need_h:
                grad_h[i:i + step] = grads.pop(0)
            for a in acc:
                if a is not None:
                    a += grads.pop(0)
        grad_w, grad_b = (None if a is None else a.to(p.dtype) for a, p in zip(acc, (weight, bias)))
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` for hidden ``[N, d]``, weight ``[V, d]``,
    bias ``[V]``, target ``[N]``, holding at most one ``[chunk_size, V]`` block of logits at a time.

    The projection runs in :func:`matmul_dtype` (autocast's dtype under autocast), the softmax in float32
    (float64 for float64 inputs); weight and bias gradients accumulate over chunks in float32.
    """
    step = chunk_rows(hidden.shape[0], weight.shape[0], chunk_size)
    rows = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, matmul_dtype(hidden, weight),
                                            float(label_smoothing), int(ignore_index), step)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum()
