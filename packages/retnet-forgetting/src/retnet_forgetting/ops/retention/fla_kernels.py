"""Thin wrappers over fla's retention kernels (CUDA only; imported lazily by the dispatcher)."""

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
                 initial_state: torch.Tensor | None) -> torch.Tensor:
    from fla.ops.common.chunk_h import chunk_fwd_h

    h, _ = chunk_fwd_h(k=k, v=v, g_gamma=log_decay, h0=initial_state, output_final_state=False,
                       chunk_size=chunk_size, states_in_fp32=True)
    return h


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
        if float((got - want).norm() / want.norm()) < 2e-2:
            return unit
    raise RuntimeError("fla's chunk_fwd_h matches neither log2 nor natural-log decays; use backend='torch'")


def fla_chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """fla's ``chunk_fwd_h`` with fp32 states: ``[B, ceil(T/C), H, Dk, Dv]``, ``h[:, c] = S_{cC-1}``."""
    log_decay = retention_log_decay(k.shape[2], k.device) * _gate_unit(str(k.device))
    return _chunk_fwd_h(k, v, log_decay, chunk_size, initial_state)
