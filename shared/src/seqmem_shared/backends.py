"""Choosing between a fast path and its pure-PyTorch reference.

Every op with a fast path takes ``backend="auto"|"torch"|"triton"`` (packages may add their own
names, e.g. ``"mamba_ssm"`` or ``"fla"``). ``"auto"`` picks the fast path for CUDA tensors when it
is usable and the reference otherwise. A missing or broken optional library is reported once, in
one log line, and never breaks import.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import torch

log = logging.getLogger("seqmem")
F = TypeVar("F", bound=Callable[..., Any])

BACKENDS = ("auto", "torch", "triton")


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device``, or CUDA when available and the CPU otherwise when it is None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def optional_import(module: str, purpose: str = "") -> ModuleType | None:
    """Import ``module`` or return None, logging the reason once per module."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure (ImportError, missing .so, CUDA init) means "absent"
        what = f" for {purpose}" if purpose else ""
        log.warning("seqmem: %s unavailable%s (%s: %s); using the PyTorch reference", module, what,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether our Triton kernels can run in this process."""
    if optional_import("triton", "Triton kernels") is None:
        return False, "triton is not installed"
    if interpret_mode():
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def resolve_backend(backend: str, *tensors: torch.Tensor, fast: str = "triton") -> str:
    """Map ``backend`` to ``"torch"`` or ``fast`` for inputs ``tensors``.

    ``"auto"`` gives ``fast`` when every tensor is on CUDA and the fast path is usable, else
    ``"torch"``. Asking for ``fast`` explicitly runs it on CPU tensors only under ``TRITON_INTERPRET=1``
    (how CI tests our kernels); when it cannot run, that raises.
    """
    if backend not in ("auto", "torch", fast):
        raise ValueError(f"backend={backend!r}: expected one of 'auto', 'torch', {fast!r}")
    if backend == "torch":
        return "torch"
    ok, why = triton_status() if fast == "triton" else (True, "")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == fast:
        if not ok:
            raise RuntimeError(f"backend={fast!r} requested but unusable: {why}")
        if not (on_cuda or (fast == "triton" and interpret_mode())):
            raise RuntimeError(f"backend={fast!r} needs CUDA tensors (or TRITON_INTERPRET=1)")
        return fast
    return fast if (ok and on_cuda) else "torch"


def without_autocast(fn: F) -> F:
    """Decorator for references that promise fp32 arithmetic (like the fused kernels they stand in for):
    runs ``fn`` with autocast off on the device of its first tensor argument. Under autocast, matmuls and
    einsums run in bf16/fp16 even on ``.float()`` inputs, which silently breaks that promise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        device = next((t.device.type for t in tensors), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
