"""RMSNorm in plain PyTorch: the oracle for the Triton kernel, and the CPU path.

All arithmetic runs in float32 (float64 inputs stay float64), then casts back:

    h = x + residual                          (only with ``residual``; stored in ``residual_dtype``)
    y = h / sqrt(mean(h**2, -1) + eps) * weight     -> x.dtype

The fused residual add returns the new residual stream ``h`` in ``promote_types(x.dtype,
residual.dtype)``: a float32 residual stream stays float32 under bfloat16 activations. ``y`` is the
norm of ``h`` *as returned* (after that rounding), so a chain of pre-norm blocks computes the same
numbers whether or not the add is fused.
"""

from __future__ import annotations

import torch
from torch import Tensor


def residual_dtype(x: Tensor, residual: Tensor) -> torch.dtype:
    """dtype of the new residual stream ``x + residual``."""
    return torch.promote_types(x.dtype, residual.dtype)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def rms_norm_reference(
    x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of ``x [..., d]`` with optional ``weight [d]`` and ``residual [..., d]``.

    Returns ``y [..., d]`` in ``x.dtype``, or ``(y, h)`` when ``residual`` is given, where
    ``h = x + residual`` is the new residual stream and ``y = rms_norm(h)``.
    """
    ct = _compute_dtype(x, residual)
    h = None
    if residual is not None:
        h = (x.to(ct) + residual.to(ct)).to(residual_dtype(x, residual))
        src = h.to(ct)
    else:
        src = x.to(ct)
    y = src * torch.rsqrt(src.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    y = y.to(x.dtype)
    return y if h is None else (y, h)
