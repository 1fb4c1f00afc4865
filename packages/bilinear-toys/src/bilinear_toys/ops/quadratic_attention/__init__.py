"""Causal quadratic attention ``z_i = sum_{j<=i} (scale * q_i . k_j)^2 v_j`` in interchangeable forms.

- ``reference.py``: the O(N^2) masked form (oracle, and the fastest form for short contexts);
- ``linear.py``: the chunked linear form over the state ``sum_j (k_j (x) k_j) v_j^T`` [D^2, Dv] and a
  one-token step for decoding;
- ``triton.py``: a Triton kernel for the linear form (CUDA, or the CPU interpreter).

:func:`quadratic_attention` dispatches: ``impl="auto"`` takes the masked form below ``crossover`` tokens
and the linear form from there on; the linear form runs the Triton kernel on CUDA (``backend="auto"``)
and the PyTorch chunked form elsewhere.
"""

from __future__ import annotations

import torch
from seqmem_shared.backends import resolve_backend

from bilinear_toys.models.config import DEFAULT_LINEAR_CROSSOVER
from bilinear_toys.ops.quadratic_attention.linear import (
    outer_features,
    quadratic_attention_chunked,
    quadratic_attention_step,
)
from bilinear_toys.ops.quadratic_attention.reference import (
    attention_scores,
    causal_mask,
    quadratic_attention_reference,
)

IMPLS = ("auto", "quadratic", "linear")


def quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                        impl: str = "auto", backend: str = "auto", chunk_size: int = 64,
                        crossover: int = DEFAULT_LINEAR_CROSSOVER) -> torch.Tensor:
    """q, k [B, T, H, D], v [B, T, H, Dv] -> z [B, T, H, Dv]; ``scale`` defaults to ``1 / D``."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(map(repr, IMPLS))}")
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: expected [B, T, H, D] with matching B, T, H, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if impl == "auto":
        impl = "linear" if q.shape[1] >= crossover else "quadratic"
    if impl == "quadratic":
        resolve_backend(backend, q, k, v)  # validates the name; the masked form is plain PyTorch
        return quadratic_attention_reference(q, k, v, scale)
    if resolve_backend(backend, q, k, v) == "triton":
        from bilinear_toys.ops.quadratic_attention.triton import quadratic_attention_triton

        return quadratic_attention_triton(q, k, v, scale, chunk_size)
    return quadratic_attention_chunked(q, k, v, scale, chunk_size)


__all__ = [
    "attention_scores",
    "causal_mask",
    "outer_features",
    "quadratic_attention",
    "quadratic_attention_chunked",
    "quadratic_attention_reference",
    "quadratic_attention_step",
]
