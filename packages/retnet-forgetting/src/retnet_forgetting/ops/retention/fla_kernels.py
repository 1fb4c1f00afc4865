"""Thin wrappers over fla's retention kernels (CUDA only; imported lazily by the dispatcher).

fla's ``chunk_retention`` is ``chunk_simple_gla`` = ``chunk_fwd_h`` (states entering every chunk) followed
by ``chunk_fwd_o`` (the output from those states). Calling the two stages separately lets the extractor
compute the chunk-entry states once per layer and use them for both the output and the requested
positions. Both stages are checked once per device against the PyTorch reference.
"""

from __future__ import annotations

import functools
import math

import torch

from retnet_forgetting.ops.retention import reference
from retnet_forgetting.ops.retention.reference import retention_log_decay


def fla_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "chunk",
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_retention`` / ``fused_recurrent_retention`` / ``parallel_retention``."""
    from fla.ops import retention as ops

    if mode == "parallel":
        return ops.parallel_retention(q, k, v, scale=scale)[0], None
    fn = ops.chunk_retention if mode == "chunk" else ops.fused_recurrent_retention
    return fn(q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _chunk_fwd_h(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int,
                 initial_state: torch.Tensor | None, fp32_states: bool = True) -> torch.Tensor:
    from fla.ops.common.chunk_h import chunk_fwd_h

    h, _ = chunk_fwd_h(k=k.contiguous(), v=v.contiguous(), g_gamma=log_decay, h0=initial_state,
                       output_final_state=False, chunk_size=chunk_size, states_in_fp32=fp32_states)
    return h


def _chunk_fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, log_decay: torch.Tensor,
                 scale: float | None, chunk_size: int) -> torch.Tensor:
    from fla.ops.common.chunk_o import chunk_fwd_o

    return chunk_fwd_o(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), h=h.to(q.dtype).contiguous(),
                       g_gamma=log_decay, scale=scale, chunk_size=chunk_size)


@functools.cache
def _log_decay(num_heads: int, device: str) -> torch.Tensor:
    """``log(gamma_h)`` in the unit fla's stage kernels take (cached per device)."""
    return retention_log_decay(num_heads, device) * _gate_unit(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@functools.cache
def _gate_unit(device: str) -> float:
    """fla's ``chunk_fwd_h`` takes decays in log2 units (fla 0.6: callers pre-scale by 1/ln 2) or, in
    other versions, natural log. Decide once per device by matching the PyTorch reference."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 200, 2, 64, generator=g).to(device, torch.bfloat16)
    v = torch.randn(1, 200, 2, 64, generator=g).to(device, torch.bfloat16)
    want = reference.chunk_states(k, v, 64)
    for unit in (1 / math.log(2), 1.0):  # the two candidates differ by far more than bf16 rounding
        got = _chunk_fwd_h(k, v, retention_log_decay(2, device) * unit, 64, None)
        if _rel(got, want) < 2e-2:
            return unit
    raise RuntimeError("fla's chunk_fwd_h matches neither log2 nor natural-log decays; use backend='torch'")


@functools.cache
def _output_stage_ok(device: str) -> bool:
    """Whether fla's ``chunk_fwd_o`` fed our states reproduces the reference output (checked once)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 200, 2, 64, generator=g).to(device, torch.bfloat16) for _ in range(3))
    h = reference.chunk_states(k, v, 64)
    got = _chunk_fwd_o(q, k, v, h, _log_decay(2, device), None, 64)
    return _rel(got, reference.chunk_output(q, k, v, h, None, 64)) < 2e-2


def fla_chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, fp32_states: bool = True) -> torch.Tensor:
    """fla's ``chunk_fwd_h``: ``[B, ceil(T/C), H, Dk, Dv]``, ``h[:, c] = S_{cC-1}``, accumulated in fp32 and
    stored in fp32 (``fp32_states``) or in ``k.dtype`` (what fla's own forward stores)."""
    return _chunk_fwd_h(k, v, _log_decay(k.shape[2], str(k.device)), chunk_size, initial_state, fp32_states)


def fla_chunk_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                     scale: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """fla's ``chunk_fwd_o`` on given chunk-entry states ``h`` (cast to ``q.dtype``): ``[B, T, H, Dv]``."""
    if not _output_stage_ok(str(q.device)):
        raise RuntimeError("fla's chunk_fwd_o does not reproduce the reference retention output")
    return _chunk_fwd_o(q, k, v, h, _log_decay(q.shape[2], str(q.device)), scale, chunk_size)
