"""Optional ``torch.compile`` of the dual-form functions (``NeuralMemory(compile=True)``).

The dual engine's per-split work is a few dozen small elementwise and matmul ops whose launch cost, not
their arithmetic, dominates at the paper's sizes; Inductor fuses the elementwise parts (GELU and its
derivative, the LayerNorm backward, the coefficient products). Measured on an H100 (NeuralMemory dim 384,
chunk 64, 2 x 1024 tokens, fp32 forward + backward): 412 -> 200 kernels, 12.6 -> 8.5 ms, but every new
shape, dtype or autocast state compiles again (tens of seconds), so it is opt-in. The compiled function
computes the same expressions (rounding may differ in the last bits).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def maybe_compiled(fn: Callable, compile: bool) -> Callable:
    """``fn`` itself, or its compiled version when ``compile`` (and not already inside a compiled region)."""
    if not compile or torch.compiler.is_compiling():
        return fn
    return _compiled(fn)
