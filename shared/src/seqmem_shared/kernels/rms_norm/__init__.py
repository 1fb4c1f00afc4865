"""RMSNorm with an optional fused residual add: Triton kernel on CUDA, PyTorch reference elsewhere.

``rms_norm(x, weight, eps, residual)`` normalizes over the last dim of ``x [..., d]``:
``y = x / sqrt(mean(x**2, -1) + eps) * weight``. With ``residual`` it first forms the new residual
stream ``h = x + residual`` (in ``promote_types(x.dtype, residual.dtype)``, so a float32 stream stays
float32) and returns ``(rms_norm(h), h)`` for chaining pre-norm blocks. ``y`` is always in
``x.dtype``; all arithmetic is float32. See ``reference.py`` (the oracle) and ``triton.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqmem_shared.backends import resolve_backend

from .reference import rms_norm_reference

__all__ = ["RMSNorm", "rms_norm", "rms_norm_reference"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(x: Tensor, weight: Tensor | None, residual: Tensor | None) -> None:
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("rms_norm: x must have at least one dim [..., d], got a scalar")
    d = x.shape[-1]
    if weight is not None and (weight.ndim != 1 or weight.shape[0] != d):
        raise ValueError(f"rms_norm: weight must have shape ({d},) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")


def rms_norm(
    x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, residual: Tensor | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of ``x [..., d]`` with optional ``weight [d]``; differentiable in x, weight, residual.

    Returns ``y [..., d]`` (``x.dtype``), or ``(y, h)`` when ``residual [..., d]`` is given, with
    ``h = x + residual`` and ``y = rms_norm(h)``. ``backend``: ``"auto"`` (Triton on CUDA),
    ``"torch"`` or ``"triton"``. float64 inputs always take the reference under ``"auto"``.
    """
    _check_inputs(x, weight, residual)
    tensors = [t for t in (x, weight, residual) if t is not None]
    choice = resolve_backend(backend, *tensors)
    if choice == "triton" and any(t.dtype not in _TRITON_DTYPES for t in tensors):
        if backend == "triton":
            bad = sorted({str(t.dtype) for t in tensors if t.dtype not in _TRITON_DTYPES})
            raise TypeError(f"rms_norm: backend='triton' supports float32/bfloat16/float16, got {bad}; "
                            "use backend='torch'")
        choice = "torch"
    if choice == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    from .triton import rms_norm_triton

    return rms_norm_triton(x, weight, eps, residual)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (size ``dim``), with a learned scale when ``elementwise_affine``.

    ``forward(x)`` -> ``y``; ``forward(x, residual)`` -> ``(y, x + residual)`` (fused add + norm).
    """

    def __init__(
        self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, backend: str = "auto",
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm: dim must be positive, got {dim}")
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return rms_norm(x, self.weight, self.eps, residual, self.backend)

    def extra_repr(self) -> str:
        affine = self.weight is not None
        return f"{self.dim}, eps={self.eps}, elementwise_affine={affine}, backend={self.backend!r}"
