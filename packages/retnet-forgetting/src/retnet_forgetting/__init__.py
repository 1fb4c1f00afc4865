"""RetNet state extraction, associative-recall probes and forgetting curves.

Public API: :class:`RetNetStateExtractor` (states at any positions in one pass), :func:`load_retnet_model`,
:func:`get_model_config`, :func:`print_model_structure`; the pure-PyTorch model lives in
:mod:`retnet_forgetting.reference`. Submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RetNetStateExtractor": "extraction",
    "load_retnet_model": "loading",
    "get_model_config": "loading",
    "print_model_structure": "loading",
    "RetNetConfig": "reference",
    "RetNetForCausalLM": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
