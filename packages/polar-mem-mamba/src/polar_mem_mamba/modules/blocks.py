"""Residual blocks of the encoder (BiMambaBlock) and decoder (MambaBlock, PolarizedMemBlock)."""

from __future__ import annotations

import torch
from seqmem_shared.kernels import RMSNorm
from torch import nn

from polar_mem_mamba.modules.mamba2 import Mamba2
from polar_mem_mamba.modules.memory_pool import MemoryPool, MemoryPoolState


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba-2: ``x + mamba(norm(x))``; x [B, L, d_model], causal."""

    def __init__(self, d_model: int, backend: str = "auto", device=None, dtype=None, **mamba) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, backend=backend, device=device, dtype=dtype)
        self.mamba = Mamba2(d_model, backend=backend, device=device, dtype=dtype, **mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mamba(self.norm(x))


class BiMambaBlock(nn.Module):
    """Bidirectional Mamba-2: a forward and a time-reversed mixer on ``norm(x)``, concatenated and projected.

    ``x + out_proj([fwd(h), flip(bwd(flip(h)))])``; every output position sees the whole sequence.
    """

    def __init__(self, d_model: int, backend: str = "auto", device=None, dtype=None, **mamba) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = RMSNorm(d_model, backend=backend, **factory)
        self.fwd = Mamba2(d_model, backend=backend, **factory, **mamba)
        self.bwd = Mamba2(d_model, backend=backend, **factory, **mamba)
        self.out_proj = nn.Linear(2 * d_model, d_model, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        backward = self.bwd(h.flip(1)).flip(1)
        return x + self.out_proj(torch.cat([self.fwd(h), backward], dim=-1))


class PolarizedMemBlock(nn.Module):
    """Decoder block: Mamba-2 fused with polarized channels, then (optionally) the memory pool.

    With ``h = norm(x)`` and ``d_inner = expand * d_model``::

        y = x + fusion([mamba(h), zero_proj(h), cumsum(one_proj(h)) / sqrt(t + 1)])

    ``zero_proj`` is the A=0 channel (no memory: the current token only) and the cumulative sum the
    A=1 channel (no decay: perfect memory of everything so far; summed in fp32 and read out scaled by
    ``1/sqrt(t+1)`` so its size stays O(1) on long streams). The fusion weights of the two polarized
    channels start at zero, so training opens them from a plain Mamba block. With ``pool_size > 0`` the
    block has its own :class:`MemoryPool` (read/write weights) over the pool state shared by the
    decoder's layers: it writes ``y`` into the pool when ``writes`` is set, then reads it:
    ``memory(y, state)``. Causal in L.
    """

    def __init__(self, d_model: int, pool_size: int = 0, summary_dim: int = 64, writes: bool = False,
                 expand: int = 2, backend: str = "auto", device=None, dtype=None, **mamba) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_inner = expand * d_model
        self.norm = RMSNorm(d_model, backend=backend, **factory)
        self.mamba = Mamba2(d_model, expand=expand, backend=backend, **factory, **mamba)
        self.zero_proj = nn.Linear(d_model, d_inner, bias=False, **factory)
        self.one_proj = nn.Linear(d_model, d_inner, bias=False, **factory)
        self.fusion = nn.Linear(d_model + 2 * d_inner, d_model, bias=False, **factory)
        with torch.no_grad():  # the polarized channels start closed: at init the block is a Mamba block
            self.fusion.weight[:, d_model:].zero_()
        self.memory = (MemoryPool(d_model, pool_size, summary_dim, writes, **factory) if pool_size > 0
                       else None)

    def forward(self, x: torch.Tensor, state: MemoryPoolState | None = None
                ) -> tuple[torch.Tensor, MemoryPoolState | None]:
        """x [B, L, d_model] (and the pool state) -> (y [B, L, d_model], updated pool state)."""
        h = self.norm(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[:, None]
        perfect = torch.cumsum(self.one_proj(h).float(), dim=1) * steps.rsqrt()
        y = x + self.fusion(torch.cat([self.mamba(h), self.zero_proj(h), perfect.to(h.dtype)], dim=-1))
        if self.memory is None:
            return y, state
        if state is None:
            state = MemoryPoolState.empty(x.shape[0], self.memory.summary_dim, device=x.device, dtype=y.dtype)
        if self.memory.writes:
            state = self.memory.write(y, state)
        return self.memory(y, state), state
