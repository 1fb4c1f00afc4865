"""``mamba_ssm``'s Triton SSD kernel (``mamba_chunk_scan_combined``), loaded without its CUDA extension.

``import mamba_ssm`` (2.x) imports the compiled ``selective_scan_cuda`` extension (Mamba-1) at the
top, so a source-only install fails to import even though the Mamba-2 Triton kernels do not need it.
:func:`load_chunk_scan` stubs the missing extension in ``sys.modules`` (only when mamba_ssm itself is
installed) and imports the kernel module directly; any failure is one log line and ``None``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import types
from collections.abc import Callable

from seqmem_shared.backends import optional_import

log = logging.getLogger("seqmem")


@functools.cache
def load_chunk_scan() -> Callable | None:
    """``mamba_chunk_scan_combined`` or None (logged once) when mamba_ssm is absent or broken."""
    try:
        installed = importlib.util.find_spec("mamba_ssm") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        log.warning("seqmem: mamba_ssm unavailable for the Mamba-2 SSD kernel (not installed); "
                    "using the PyTorch reference")
        return None
    if "selective_scan_cuda" not in sys.modules:
        try:
            importlib.import_module("selective_scan_cuda")
        except Exception:  # noqa: BLE001 - missing or ABI-incompatible extension: Mamba-2 does not need it
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
            log.info("seqmem: selective_scan_cuda (Mamba-1 CUDA extension) missing; stubbed to load the "
                     "Mamba-2 Triton kernels")
    module = optional_import("mamba_ssm.ops.triton.ssd_combined", "the Mamba-2 SSD kernel")
    return getattr(module, "mamba_chunk_scan_combined", None) if module is not None else None
