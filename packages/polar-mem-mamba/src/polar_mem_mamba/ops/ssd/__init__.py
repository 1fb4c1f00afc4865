"""Mamba-2 SSD scan: ``ssd(x, dt, A, B, C, chunk_size, ..., backend=)``.

``backend="auto"`` runs mamba_ssm's Triton kernel on CUDA tensors when it loads and the chunked
PyTorch reference otherwise; ``"torch"`` forces the reference; ``"mamba_ssm"`` forces the kernel.
Shapes and semantics: :mod:`polar_mem_mamba.ops.ssd.reference`.
"""

from __future__ import annotations

import math

import torch
from seqmem_shared.backends import resolve_backend

from polar_mem_mamba.ops.ssd.mamba_ssm import load_chunk_scan
from polar_mem_mamba.ops.ssd.reference import ssd_chunked, ssd_recurrent

__all__ = ["load_chunk_scan", "ssd", "ssd_backend", "ssd_chunked", "ssd_recurrent"]


def ssd_backend(backend: str, x: torch.Tensor) -> str:
    """``"mamba_ssm"`` or ``"torch"``: what :func:`ssd` runs for ``backend`` and input ``x``."""
    which = resolve_backend(backend, x, fast="mamba_ssm")
    if which == "mamba_ssm" and load_chunk_scan() is None:
        if backend == "mamba_ssm":
            raise RuntimeError("backend='mamba_ssm' requested but mamba_ssm's SSD kernel cannot be loaded")
        return "torch"
    return which


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan on the chosen backend; arguments as ``mamba_chunk_scan_combined``."""
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
                  dt_limit=dt_limit, return_final_states=return_final_states)
    if ssd_backend(backend, x) == "mamba_ssm":
        return load_chunk_scan()(x, dt, A, B, C, chunk_size, **kwargs)
    return ssd_chunked(x, dt, A, B, C, chunk_size, **kwargs)
