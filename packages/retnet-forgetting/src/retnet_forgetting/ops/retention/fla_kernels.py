"""Thin wrappers over fla's retention kernels (CUDA only; imported lazily by the dispatcher)."""

from __future__ import annotations

import torch

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


def fla_chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """fla's ``chunk_fwd_h`` with fp32 states: ``[B, ceil(T/C), H, Dk, Dv]``, ``h[:, c] = S_{cC-1}``."""
    from fla.ops.common.chunk_h import chunk_fwd_h

    g_gamma = retention_log_decay(k.shape[2], k.device)
    h, _ = chunk_fwd_h(k=k, v=v, g_gamma=g_gamma, h0=initial_state, output_final_state=False,
                       chunk_size=chunk_size, states_in_fp32=True)
    return h
