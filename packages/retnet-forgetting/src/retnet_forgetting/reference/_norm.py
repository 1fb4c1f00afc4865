"""RMSNorm for the reference model (from seqmem_shared.kernels)."""

from __future__ import annotations

try:
    from seqmem_shared.kernels import RMSNorm, rms_norm
except ImportError:  # TEMPORARY fallback until seqmem_shared.kernels.rms_norm lands; removed before finishing
    import torch
    from torch import nn

    def rms_norm(x, weight=None, eps=1e-6, residual=None, backend="auto"):
        if residual is not None:
            x = x + residual
            return rms_norm(x, weight, eps), x
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        y = y * weight.float() if weight is not None else y
        return y.to(x.dtype)

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-6, elementwise_affine=True, backend="auto"):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

        def forward(self, x, residual=None):
            return rms_norm(x, self.weight, self.eps, residual)

__all__ = ["RMSNorm", "rms_norm"]
