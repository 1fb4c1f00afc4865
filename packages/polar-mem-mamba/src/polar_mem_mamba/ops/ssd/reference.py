"""Mamba-2 state-space duality (SSD) in plain PyTorch: the chunked algorithm and the token recurrence.

Per head ``h`` (state ``S`` of shape [headdim, d_state]) the scan is::

    dt_t = softplus(dt_t + dt_bias)            (bias and softplus optional, then clamped to dt_limit)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t                   (then y_t * silu(z_t) if z is given)

:func:`ssd_chunked` computes the same outputs in blocks of ``chunk_size`` tokens: a masked
"attention-like" product inside each chunk plus a short recurrence over chunk-boundary states, all in
fp32, also under autocast (which would otherwise run the einsums in bf16 whatever their inputs' dtype).
:func:`ssd_recurrent` runs the recurrence token by token and is the oracle in tests. Both take the
signature of ``mamba_ssm``'s ``mamba_chunk_scan_combined``:

    x [B, L, H, P], dt [B, L, H], A [H], B/C [B, L, G, N] (G groups shared by H // G heads each),
    D [H] or [H, P], z [B, L, H, P], dt_bias [H], initial_states [B, H, P, N] -> y [B, L, H, P]
    (and the final state [B, H, P, N] with ``return_final_states=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from seqmem_shared.backends import without_autocast


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit):
    """fp32 inputs, processed dt and B/C expanded from groups to heads."""
    heads, groups = x.shape[2], B.shape[2]
    if heads % groups:
        raise ValueError(f"B/C groups: expected a divisor of nheads={heads}, got {groups}")
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    B = repeat(B.float(), "b l g n -> b l (g r) n", r=heads // groups)
    C = repeat(C.float(), "b l g n -> b l (g r) n", r=heads // groups)
    return x.float(), dt, A.float(), B, C


def _finish(y, x, D, z, dtype):
    if D is not None:
        y = y + x * (D.float()[..., None] if D.ndim == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


@without_autocast
def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (see the module docstring for shapes); differentiable, fp32 inside."""
    dtype, length = x.dtype, x.shape[1]
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit)
    pad = (-length) % chunk_size  # padded steps have dt = 0: no decay and no input, so states are exact
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    x, B, C = (rearrange(t, "b (c s) h d -> b c s h d", s=chunk_size) for t in (x, B, C))
    dt = rearrange(dt, "b (c s) h -> b c s h", s=chunk_size)
    log_decay = torch.cumsum(dt * A, dim=2)  # [b c s h]: sum of dt*A from the chunk start to s (inclusive)
    x_dt = x * dt[..., None]

    # inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    gap = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # [b c t s h]
    weights = torch.exp(gap.masked_fill(~causal[:, :, None], -math.inf))
    weights = weights * torch.einsum("bcthn,bcshn->bctsh", C, B)
    y = torch.einsum("bctsh,bcshp->bcthp", weights, x_dt)

    # state each chunk adds at its end, then the recurrence over chunk boundaries
    to_end = torch.exp(log_decay[:, :, -1:, :] - log_decay)  # [b c s h]
    chunk_states = torch.einsum("bcshn,bcsh,bcshp->bchpn", B, to_end, x_dt)
    chunk_decay = torch.exp(log_decay[:, :, -1, :])  # [b c h]
    state = (x.new_zeros(x.shape[0], x.shape[3], x.shape[4], B.shape[-1]) if initial_states is None
             else initial_states.float())
    entering = []
    for c in range(x.shape[1]):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b c h p n]: state before each chunk
    y = y + torch.einsum("bcthn,bchpn,bcth->bcthp", C, entering, torch.exp(log_decay))

    y = rearrange(y, "b c s h p -> b (c s) h p")[:, :length]
    x = rearrange(x, "b c s h p -> b (c s) h p")[:, :length]
    y = _finish(y, x, D, z, dtype)
    return (y, state) if return_final_states else y


@without_autocast
def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence with :func:`ssd_chunked`'s signature (``chunk_size`` is unused)."""
    dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit)
    state = (x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1]) if initial_states is None
             else initial_states.float())
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # [b h 1 1]
        update = torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        state = decay * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = _finish(torch.stack(ys, dim=1), x, D, z, dtype)
    return (y, state) if return_final_states else y
