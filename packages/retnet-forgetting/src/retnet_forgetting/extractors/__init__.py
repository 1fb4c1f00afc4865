"""One extractor API for every model with a matrix-valued recurrent state (see :mod:`.base`).

======================  ===========================================  =====================================
family                  extractor                                     state update / in-chunk form
======================  ===========================================  =====================================
RetNet                  :class:`retnet_forgetting.RetNetStateExtractor`  fixed decay per head (own module)
GLA                     :class:`GLAStateExtractor`                    decay per key channel, chunked
Mamba-2                 :class:`Mamba2StateExtractor`                 scalar decay per head and token
DeltaNet                :class:`DeltaNetStateExtractor`               delta rule, UT/WY form per chunk
Gated DeltaNet          :class:`GatedDeltaNetStateExtractor`          gated delta rule, UT/WY form per chunk
======================  ===========================================  =====================================

:func:`extractor_for` picks the extractor from the model's mixers (fla's classes or this package's
reference ones). Submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StateExtractor": "base",
    "StateInputs": "base",
    "GLAStateExtractor": "gla",
    "gla_reference_model": "gla",
    "Mamba2StateExtractor": "mamba2",
    "mamba2_reference_model": "mamba2",
    "DeltaNetStateExtractor": "delta_net",
    "GatedDeltaNetStateExtractor": "delta_net",
    "delta_net_reference_model": "delta_net",
    "gated_delta_net_reference_model": "delta_net",
}
_FAMILIES = ("GLAStateExtractor", "Mamba2StateExtractor", "GatedDeltaNetStateExtractor",
             "DeltaNetStateExtractor")

__all__ = sorted([*_EXPORTS, "extractor_for"])


def extractor_for(model: Any, **kwargs: Any) -> Any:
    """The extractor of ``model``'s family (RetNet, GLA, Mamba-2, DeltaNet, Gated DeltaNet), built with
    ``kwargs``; TypeError listing the families when none matches."""
    from retnet_forgetting.extraction import RetNetStateExtractor

    for name in _FAMILIES:
        cls = __getattr__(name)
        try:
            cls.find_mixers(model)
        except TypeError:
            continue
        return cls(model, **kwargs)
    try:
        return RetNetStateExtractor(model, **kwargs)
    except TypeError:
        raise TypeError(f"model: {type(model).__name__} is none of RetNet, GLA, Mamba-2, DeltaNet, "
                        f"Gated DeltaNet (no extractor)") from None


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
