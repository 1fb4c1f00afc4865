"""Helpers of the ``bench/`` scripts: per-call timing, peak memory, copy bandwidth, environment, JSON output.

Timing uses CUDA events around each call on a CUDA device (one synchronization at the end, so the host
runs ahead as in real use) and ``time.perf_counter`` elsewhere; results are medians over the timed
calls, in milliseconds::

    t = measure(lambda: model(x), warmup=5, reps=50)        # Timing(median_ms=..., min_ms=..., ...)
    peak = peak_memory(lambda: model(x).sum().backward())   # Peak(peak_bytes=..., extra_bytes=...)
    print_json({"benchmark": "model", **environment("liger-kernel"), "fwd_ms": t.median_ms}, out)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from seqmem_shared.backends import default_device

__all__ = ["Peak", "Timing", "copy_bandwidth_gbps", "environment", "measure", "median_ms", "peak_memory",
           "print_json", "short_error"]

L2_FLUSH_BYTES = 256 * 2**20  # more than the L2 cache of any current GPU (H100: 50 MiB)


@dataclass(frozen=True)
class Timing:
    """Per-call times of :func:`measure`, in milliseconds, over ``reps`` timed calls."""

    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure(fn: Callable[[], Any], *, warmup: int = 5, reps: int = 50,
            device: torch.device | str | None = None, grad_to_none: Iterable[torch.Tensor] = (),
            flush_l2: bool = False) -> Timing:
    """Call ``fn`` ``warmup`` times, then time ``reps`` calls one by one.

    ``device`` is where ``fn`` runs (default: CUDA when available): CUDA events bracket each call there,
    ``perf_counter`` (after each call returns) elsewhere. ``grad_to_none`` tensors get ``.grad = None``
    before every call, outside the timed region. ``flush_l2`` (CUDA) overwrites a 256 MiB buffer before
    every timed call, so each starts with a cold L2 cache as ``triton.testing.do_bench`` does.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"measure: expected reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = default_device(device)
    leaves = list(grad_to_none)

    def reset() -> None:
        for t in leaves:
            t.grad = None

    for _ in range(warmup):
        reset()
        fn()
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        torch.cuda.synchronize(device)
        for start, end in events:
            reset()
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            reset()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    reset()
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
    return Timing(median_ms=median, min_ms=times[0], max_ms=times[-1], reps=reps)


def median_ms(fn: Callable[[], Any], **kwargs: Any) -> float:
    """``measure(fn, **kwargs).median_ms``."""
    return measure(fn, **kwargs).median_ms


class Peak(NamedTuple):
    """CUDA memory while a call ran: the allocated peak, and that peak minus what was allocated before."""

    peak_bytes: int
    extra_bytes: int


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> Peak | None:
    """Peak CUDA memory allocated during ``fn()`` (None when ``device`` is not a CUDA device)."""
    device = default_device(device)
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return Peak(peak, peak - base)


def copy_bandwidth_gbps(nbytes: int = 2**30, device: torch.device | str | None = None) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second / 1e9, measured on ``nbytes``."""
    device = default_device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=5, reps=50, device=device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unavailable"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - absent or broken: report, do not fail the benchmark
        return "unavailable"
    return triton.__version__


def environment(*packages: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """What a benchmark ran on: UTC date, device (the GPU's name, else "cpu"), torch, CUDA, triton and
    python versions, plus the installed version (or "unavailable") of each distribution in ``packages``
    under its name with ``-`` -> ``_`` (``environment("liger-kernel")`` adds ``"liger_kernel"``)."""
    device = default_device(device)
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
    }
    info.update({p.replace("-", "_"): _version(p) for p in packages})
    return info


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``"TypeName: first line of the message"`` (cut at ``limit`` characters), for results tables."""
    first = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def print_json(results: Any, out: str | os.PathLike | None = None) -> str:
    """Print ``results`` as indented JSON and, when ``out`` is given, write it there atomically."""
    text = json.dumps(results, indent=2)
    print(text, flush=True)
    if out:
        from seqmem_shared.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    return text
