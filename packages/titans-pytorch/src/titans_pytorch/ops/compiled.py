"""Optional ``torch.compile`` of the dual-form functions (the ``compile`` option of NeuralMemory).

The dual engine's per-split work is a few dozen small elementwise and matmul ops whose launch cost, not
their arithmetic, dominates at the paper's sizes; Inductor fuses the elementwise parts (GELU and its
derivative, the LayerNorm backward, the coefficient products) and replays the rest with less overhead.
The compiled function computes the same expressions (rounding may differ in the last bits).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from seqmem_shared.backends import optional_import
from torch import Tensor


@functools.cache
def _compile_usable() -> bool:
    """Inductor on CUDA needs Triton; without it ``compile=None`` stays eager."""
    return optional_import("triton", "compiled NeuralMemory dual form") is not None


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def maybe_compiled(fn: Callable, compile: bool | None, like: Tensor) -> Callable:
    """``fn`` compiled when ``compile`` is True, or None with ``like`` on CUDA and Triton importable."""
    if compile is None:
        compile = like.is_cuda and _compile_usable()
    if not compile or torch.compiler.is_compiling():
        return fn
    return _compiled(fn)
