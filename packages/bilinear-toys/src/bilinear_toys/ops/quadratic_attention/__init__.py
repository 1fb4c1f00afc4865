"""Causal quadratic attention ``z_i = sum_{j<=i} (scale * q_i . k_j)^2 v_j`` in interchangeable forms.

- ``reference.py``: the O(N^2) masked form (oracle, and the fastest form for short contexts);
- ``linear.py``: the chunked linear form over the state ``sum_j (k_j (x) k_j) v_j^T`` [D^2, Dv] (a loop
  over chunks, and the chunkwise form with all chunks at once) and a one-token step for decoding;
- ``triton.py``: a Triton kernel for the linear form's forward (CUDA, or the CPU interpreter); its
  backward recomputes through the chunkwise form.

:func:`quadratic_attention` dispatches: ``impl="auto"`` takes the masked form below ``crossover`` tokens
and the linear form from there on. The linear form runs the chunkwise PyTorch form for ``backend="auto"``
or ``"torch"`` (on an H100 it beat the Triton kernel 11x forward and 4.7x forward+backward at 16384
tokens: batched tensor-core matmuls against a kernel that walks the state's rows one by one), and the
Triton kernel only when asked for by ``backend="triton"``.
"""

from __future__ import annotations

import torch
from seqmem_shared.backends import resolve_backend

from bilinear_toys.models.config import DEFAULT_LINEAR_CROSSOVER
from bilinear_toys.ops.quadratic_attention.linear import (
    outer_features,
    quadratic_attention_chunked,
    quadratic_attention_chunkwise,
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
    resolved = resolve_backend(backend, q, k, v)
    if backend == "triton" and resolved == "triton":
        from bilinear_toys.ops.quadratic_attention.triton import quadratic_attention_triton

        return quadratic_attention_triton(q, k, v, scale, chunk_size)
    return quadratic_attention_chunkwise(q, k, v, scale, chunk_size)


__all__ = [
    "attention_scores",
    "causal_mask",
    "outer_features",
    "quadratic_attention",
    "quadratic_attention_chunked",
    "quadratic_attention_chunkwise",
    "quadratic_attention_reference",
    "quadratic_attention_step",
]
