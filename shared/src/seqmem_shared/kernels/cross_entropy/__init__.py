"""Cross-entropy over a vocabulary: ``cross_entropy`` on logits, ``linear_cross_entropy`` on hidden states.

``backend="auto"`` runs the Triton kernels (:mod:`.triton`) on CUDA tensors and the PyTorch reference
(:mod:`.reference`) elsewhere; ``"torch"`` / ``"triton"`` force one. Both return a float32 loss whatever
the input dtype; gradients come back in the inputs' dtypes.

Target values must be ``ignore_index`` or lie in ``[0, V)``. On CPU tensors a violation raises ValueError;
on CUDA tensors the check would cost a device sync, so it is skipped: the Triton kernel then gives that
row a NaN loss (and the torch reference a device-side assert).
"""

from __future__ import annotations

import torch

from ...backends import resolve_backend
from . import reference

__all__ = ["cross_entropy", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_options(label_smoothing: float, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(map(repr, _REDUCTIONS))}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")


def _check_matrix(name: str, tensor: torch.Tensor, what: str) -> None:
    if tensor.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D {what} tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {tensor.dtype}")


def _check_target(target: torch.Tensor, n_rows: int, vocab_size: int, ignore_index: int) -> None:
    if target.shape != (n_rows,):
        raise ValueError(f"target: expected shape ({n_rows},) (one class index per row), "
                         f"got {tuple(target.shape)}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target: expected an integer dtype, got {target.dtype}")
    if target.device.type == "cpu" and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target: values must lie in [0, {vocab_size}) or equal "
                             f"ignore_index={ignore_index}, found {value}")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy`` of logits ``[N, V]`` (fp32/bf16/fp16) and class indices ``target [N]``.

    Label smoothing ``eps`` as in PyTorch: ``(1 - eps) * nll + eps * mean_c(-log p_c)``; rows whose target is
    ``ignore_index`` contribute 0 and ``"mean"`` divides by the number of other rows (NaN when there are
    none). Returns a float32 scalar (``"mean"``, ``"sum"``) or ``[N]`` (``"none"``).

    ``inplace_backward=True`` lets the Triton path write the gradient over ``logits`` (one ``[N, V]``
    buffer less): pass it only when nothing else needs the values of ``logits`` afterwards.
    """
    _check_options(label_smoothing, reduction)
    _check_matrix("logits", logits, "[N, V]")
    _check_target(target, logits.shape[0], logits.shape[1], ignore_index)
    if resolve_backend(backend, logits, target) == "triton":
        from .triton import cross_entropy as fast

        return fast(logits, target, label_smoothing, ignore_index, reduction,
                    inplace_backward=inplace_backward)
    return reference.cross_entropy(logits, target, label_smoothing, ignore_index, reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materializing the ``[N, V]`` logits.

    hidden ``[N, d]``, weight ``[V, d]`` (an output head's ``.weight``), bias ``[V]`` or None, target ``[N]``.
    Tokens go ``chunk_size`` at a time (default: as many as keep a chunk's logits within
    ``reference.LOGITS_BUDGET`` elements), so peak memory does not grow with ``V`` beyond ``weight`` and its
    gradient. The projection runs in autocast's dtype under autocast (else the promoted dtype of
    ``hidden`` and ``weight``), the softmax in float32; weight gradients accumulate in float32.
    """
    _check_options(label_smoothing, reduction)
    _check_matrix("hidden", hidden, "[N, d]")
    _check_matrix("weight", weight, "[V, d]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[1]}] to match hidden [N, d], "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int or None")
    _check_target(target, hidden.shape[0], weight.shape[0], ignore_index)
    tensors = (hidden, weight, target) if bias is None else (hidden, weight, bias, target)
    if resolve_backend(backend, *tensors) == "triton":
        from .triton import linear_cross_entropy as fast

        return fast(hidden, weight, target, bias, label_smoothing, ignore_index, reduction, chunk_size)
    return reference.linear_cross_entropy(hidden, weight, target, bias, label_smoothing, ignore_index,
                                          reduction, chunk_size)

