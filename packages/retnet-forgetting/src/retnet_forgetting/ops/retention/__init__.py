"""Retention: recurrent, chunked and parallel forms, chunk-entry states, the output from given chunk-entry
states, and states at any positions.

``backend="auto"`` runs fla's kernels for CUDA tensors when fla is installed and the PyTorch reference
otherwise; ``"torch"`` forces the reference, ``"fla"`` forces fla (raises when it cannot run).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from seqmem_shared.backends import optional_import, resolve_backend

from retnet_forgetting.ops.retention import reference
from retnet_forgetting.ops.retention.positions import PositionGroups
from retnet_forgetting.ops.retention.reference import (
    DEFAULT_CHUNK_SIZE,
    chunk_retention,
    parallel_retention,
    recurrent_retention,
    retention_log_decay,
)

MODES = ("chunk", "recurrent", "parallel")
BACKENDS = ("auto", "torch", "fla")  # the retention kernels (and the reference model's retention)
STATE_BACKENDS = (*BACKENDS, "triton")  # states at positions: also the Triton in-chunk correction alone
BAD_TRITON_ON_HOPPER = ((3, 4, 0), (3, 7, 1))  # [from, to): see fla_backward_hazard

__all__ = [
    "BACKENDS", "DEFAULT_CHUNK_SIZE", "MODES", "STATE_BACKENDS", "check_backend", "chunk_output",
    "chunk_retention", "chunk_states", "fla_backward_hazard", "fla_backward_hazard_on",
    "parallel_retention", "recurrent_retention", "retention", "retention_log_decay", "states_at_positions",
]


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    """Raise ``ValueError`` naming ``backend`` and ``allowed`` when it is not one of them."""
    if backend not in allowed:
        raise ValueError(f"backend={backend!r}: expected one of {allowed}")


def fla_backward_hazard(capability: tuple[int, int], triton_version: str) -> str | None:
    """Why fla's chunked retention backward cannot be trusted on a GPU of compute ``capability`` with
    Triton ``triton_version``, or None. Triton >= 3.4.0 and < 3.7.1 miscompiles fla's
    ``chunk_bwd_kernel_dqkwg`` on Hopper (sm_90): wrong ``dk`` (fla issue #640) and, for some shapes, an
    illegal memory access (a 2-layer RetNet with d_k 32 on an H100 with Triton 3.6, 2026-12-07)."""
    release = tuple(int(x) for x in re.findall(r"\d+", triton_version)[:3])
    if tuple(capability)[:1] != (9,) or not BAD_TRITON_ON_HOPPER[0] <= release < BAD_TRITON_ON_HOPPER[1]:
        return None
    return (f"Triton {triton_version} miscompiles fla's chunked retention backward on Hopper "
            "(fla issue #640; fixed in Triton 3.7.1)")


@functools.cache
def fla_backward_hazard_on(device: torch.device | str) -> str | None:
    """:func:`fla_backward_hazard` for ``device`` (None off CUDA or without Triton); cached, since every
    retention call with gradients asks."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        import triton
    except ImportError:
        return None
    return fla_backward_hazard(torch.cuda.get_device_capability(device), triton.__version__)


def _backend(backend: str, *tensors: torch.Tensor, backward: bool = False) -> str:
    """The backend that runs; ``backward``: gradients will flow through fla's chunked kernels."""
    check_backend(backend)
    choice = resolve_backend(backend, *tensors, fast="fla")
    if choice == "fla" and optional_import("fla.ops.retention", "retention kernels") is None:
        if backend == "fla":
            raise RuntimeError("backend='fla' requested but fla is not importable "
                               "(pip install flash-linear-attention)")
        return "torch"
    hazard = fla_backward_hazard_on(tensors[0].device) if choice == "fla" and backward else None
    if hazard:
        if backend == "fla":
            raise RuntimeError(f"backend='fla': {hazard}; expected backend='auto' or 'torch' for training")
        _warn_once(f"{hazard}: retention with gradients runs in PyTorch")
        return "torch"
    return choice


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "chunk",
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, backend: str = "auto",
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention output ``[B, T, H, Dv]`` and (optionally) the final state ``[B, H, Dk, Dv]`` fp32.

    ``mode``: ``"chunk"`` (chunked parallel), ``"recurrent"`` (token by token) or ``"parallel"``
    (quadratic; no initial/final state).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode == "parallel" and (initial_state is not None or output_final_state):
        raise ValueError("mode='parallel' takes no initial_state and returns no final state; use 'chunk'")
    tensors = (q, k, v) if initial_state is None else (q, k, v, initial_state)
    backward = mode == "chunk" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if _backend(backend, q, k, v, backward=backward) == "fla":
        from retnet_forgetting.ops.retention.fla_kernels import fla_retention

        return fla_retention(q, k, v, mode, scale, initial_state, output_final_state)
    if mode == "parallel":
        return parallel_retention(q, k, v, scale), None
    fn = chunk_retention if mode == "chunk" else recurrent_retention
    return fn(q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 initial_state: torch.Tensor | None = None, backend: str = "auto",
                 fp32_states: bool = True) -> torch.Tensor:
    """States entering each chunk, ``[B, ceil(T/C), H, Dk, Dv]`` (``h[:, c] = S_{cC-1}``), accumulated in
    fp32 and stored in fp32, or in ``k.dtype`` when ``fp32_states=False`` (as fla's own forward does)."""
    if _backend(backend, k, v) == "fla":
        from retnet_forgetting.ops.retention.fla_kernels import fla_chunk_states

        try:
            return fla_chunk_states(k, v, chunk_size, initial_state, fp32_states)
        except (TypeError, ImportError, RuntimeError) as exc:  # fla's internal API moved: stay correct
            if backend == "fla":
                raise
            _warn_once(f"fla chunk_fwd_h unusable ({type(exc).__name__}: {exc}); chunk states use PyTorch")
    h = reference.chunk_states(k, v, chunk_size, initial_state)
    return h if fp32_states else h.to(k.dtype)


def chunk_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                 scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 backend: str = "auto") -> torch.Tensor:
    """Retention output ``[B, T, H, Dv]`` from the chunk-entry states ``h`` of :func:`chunk_states` (what
    ``retention(mode="chunk")`` computes, without recomputing ``h``): fla's ``chunk_fwd_o`` on CUDA, or
    fla's whole ``chunk_retention`` when that stage is unusable."""
    if _backend(backend, q, k, v) == "fla":
        from retnet_forgetting.ops.retention.fla_kernels import fla_chunk_output, fla_retention

        try:
            return fla_chunk_output(q, k, v, h, scale, chunk_size)
        except (TypeError, ImportError, RuntimeError) as exc:  # fla's internal API moved: stay correct
            if backend == "fla":
                raise
            _warn_once(f"fla chunk_fwd_o unusable ({type(exc).__name__}: {exc}); using chunk_retention")
            return fla_retention(q, k, v, "chunk", scale)[0]
    return reference.chunk_output(q, k, v, h, scale, chunk_size)


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("seqmem").warning("seqmem: %s", message)


def states_at_positions(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        h: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        initial_state: torch.Tensor | None = None, backend: str = "auto",
                        out_dtype: torch.dtype = torch.float32, precision: str = "auto",
                        checked: bool = False, groups: PositionGroups | None = None) -> torch.Tensor:
    """``S_t`` (state after token ``t``) for ``positions [K]`` or ``[B, K]``: ``[B, K, H, Dk, Dv]``.

    Accumulates in fp32 and returns ``out_dtype``. ``backend``: ``"auto"`` (fla chunk states and the
    Triton correction on CUDA), ``"torch"``, ``"fla"`` (fla chunk states) or ``"triton"`` (the Triton
    correction; on CPU only under ``TRITON_INTERPRET=1``). ``precision``: the Triton dot (``"auto"``,
    ``"fast"`` tensor cores, ``"ieee"`` fp32; see ``triton_states``). ``checked=True``: ``positions`` is
    already a valid ``[B, K]`` long tensor (skips the range check, which syncs for device tensors).
    ``groups``: ``positions.position_groups`` of the positions for the Triton kernel (made from
    ``positions`` when None: pass them when ``positions`` live on the device, to avoid a sync).
    """
    check_backend(backend, STATE_BACKENDS)
    if h is None:
        h = chunk_states(k, v, chunk_size, initial_state, backend="auto" if backend == "triton" else backend)
    if not checked:
        positions = reference._as_batch_positions(positions, k.shape[0], k.shape[1])
    use_triton = backend == "triton" or (backend in ("auto", "fla") and _triton_ok(k, v, chunk_size))
    if use_triton and resolve_backend("triton" if backend == "triton" else "auto", k) == "triton":
        from retnet_forgetting.ops.retention.triton_states import states_at_positions_triton

        log_g = _log_decay(k.shape[2], str(k.device))
        return states_at_positions_triton(k, v, positions, h, log_g, chunk_size, out_dtype, precision, groups)
    positions = positions.to(k.device)
    return reference.states_at_positions(k, v, positions, h=h, chunk_size=chunk_size).to(out_dtype)


@functools.cache
def _log_decay(num_heads: int, device: str) -> torch.Tensor:
    return retention_log_decay(num_heads, device)


def _triton_ok(k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> bool:
    pow2 = chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0
    shapes_ok = pow2 and min(k.shape[-1], v.shape[-1]) >= 16
    return k.is_cuda and shapes_ok and optional_import("triton", "the in-chunk state kernel") is not None
