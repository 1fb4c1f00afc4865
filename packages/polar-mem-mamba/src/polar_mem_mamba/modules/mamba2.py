"""The Mamba-2 mixer: in_proj -> short causal conv -> SSD scan -> gated RMSNorm -> out_proj."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from seqmem_shared.kernels import RMSNorm
from torch import nn

from polar_mem_mamba.ops.conv import causal_conv1d
from polar_mem_mamba.ops.ssd import ssd


class Mamba2(nn.Module):
    """Mamba-2 token mixer, ``[B, L, d_model] -> [B, L, d_model]``, causal in L.

    Parameters follow ``mamba_ssm.Mamba2(d_model, d_state, d_conv, expand, headdim, ngroups,
    chunk_size, ...)``: ``d_inner = expand * d_model`` split into ``d_inner // headdim`` heads, each a
    scalar-decay SSM (``A = -exp(A_log)``) with a ``[headdim, d_state]`` state; B/C are shared by
    ``ngroups`` groups of heads. ``backend`` ("auto" | "torch") picks the fast CUDA kernels
    (mamba_ssm SSD, causal_conv1d, Triton RMSNorm) or the pure-PyTorch references.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2: headdim={headdim} must divide expand * d_model = {d_inner}")
        self.d_model, self.d_state, self.d_inner, self.headdim = d_model, d_state, d_inner, headdim
        self.nheads, self.ngroups = d_inner // headdim, ngroups
        self.chunk_size, self.backend = chunk_size, backend
        factory = {"device": device, "dtype": dtype}
        conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + conv_dim + self.nheads, bias=False, **factory)
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, d_conv, **factory))
        self.conv_bias = nn.Parameter(torch.zeros(conv_dim, **factory))
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(d_conv), 1 / math.sqrt(d_conv))
        # dt ~ log-uniform in [dt_min, dt_max], stored as softplus^-1(dt); A ~ uniform in A_init_range
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype or torch.float32))
        A = torch.empty(self.nheads, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.D = nn.Parameter(torch.ones(self.nheads, **factory))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNorm(d_inner, eps=1e-5, backend=backend, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, d_model] -> [B, L, d_model]."""
        bc = self.ngroups * self.d_state
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * bc, self.nheads], dim=-1)
        xbc = causal_conv1d(xbc.transpose(1, 2), self.conv_weight, self.conv_bias, backend=self.backend)
        x, B, C = torch.split(xbc.transpose(1, 2), [self.d_inner, bc, bc], dim=-1)
        y = ssd(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim).contiguous(),
            dt.contiguous(),
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups).contiguous(),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups).contiguous(),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            backend=self.backend,
        )
        y = rearrange(y, "b l h p -> b l (h p)")
        y = self.norm(y * F.silu(z))  # gated RMSNorm (gate before the norm, as Mamba-2)
        return self.out_proj(y)
