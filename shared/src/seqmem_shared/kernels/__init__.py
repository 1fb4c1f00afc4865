"""Fused kernels with pure-PyTorch references: RMSNorm and cross-entropy.

Each op takes ``backend="auto"|"torch"|"triton"``: ``"auto"`` runs the Triton kernel on CUDA tensors
and the reference elsewhere. Submodules load on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "rms_norm": "rms_norm",
    "RMSNorm": "rms_norm",
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "cross_entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
