"""Pure-PyTorch retention (RetNet's multi-scale decay linear attention): the oracle for every fast path.

Layout as in fla: ``q, k: [B, T, H, Dk]``, ``v: [B, T, H, Dv]``, states ``[B, H, Dk, Dv]``. Head ``h``
decays by ``gamma_h = 1 - 2^(-5-h)`` per token; the ``1/sqrt(Dk)`` scale multiplies ``q`` only, so the
state is unscaled::

    S_t = gamma * S_{t-1} + k_t^T v_t            o_t = scale * q_t S_t

The state "at position t" is ``S_t``: it includes token ``t``. Everything accumulates in fp32, also under
autocast (turned off inside, as fla's kernels accumulate in fp32), and outputs are cast back to ``q.dtype``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from seqmem_shared.backends import without_autocast

DEFAULT_CHUNK_SIZE = 64


def retention_log_decay(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``log(gamma_h) = log(1 - 2^(-5-h))`` for ``h = 0..num_heads-1``: ``[H]`` float32."""
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.exp2(-5.0 - h))


def _check_qkv(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k, v: expected [B, T, H, D] tensors, got shapes {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or (q is not None and q.shape != k.shape):
        shapes = f"q {None if q is None else tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        raise ValueError(f"{shapes}: expected q and k [B, T, H, Dk] and v [B, T, H, Dv]")


@without_autocast
def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """Quadratic form ``o = ((q k^T) * D) v`` with ``D[t, i] = gamma^(t-i) [i <= t]``: ``[B, T, H, Dv]``."""
    _check_qkv(q, k, v)
    T, H, Dk = q.shape[1], q.shape[2], q.shape[3]
    scale = Dk ** -0.5 if scale is None else scale
    t = torch.arange(T, device=q.device, dtype=torch.float32)
    lag = t[:, None] - t[None, :]
    decay = torch.exp(lag[None] * retention_log_decay(H, q.device)[:, None, None]) * (lag >= 0)
    scores = torch.einsum("bthd,bshd->bhts", q.float() * scale, k.float()) * decay
    return torch.einsum("bhts,bshv->bthv", scores, v.float()).to(q.dtype)


@without_autocast
def recurrent_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence: ``(o [B, T, H, Dv], final state [B, H, Dk, Dv] fp32 or None)``."""
    _check_qkv(q, k, v)
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    gamma = retention_log_decay(H, q.device).exp()[None, :, None, None]
    S = (q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32) if initial_state is None
         else initial_state.float().clone())
    outs = []
    for t in range(T):
        S = gamma * S + torch.einsum("bhk,bhv->bhkv", k[:, t].float(), v[:, t].float())
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float() * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape).float()
    return o.to(q.dtype), (S if output_final_state else None)


@without_autocast
def chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """States entering each chunk: ``h[:, c] = S_{c*C - 1}`` (``h[:, 0]`` = initial state or 0).

    Returns ``[B, ceil(T/C), H, Dk, Dv]`` float32, the same quantity as fla's ``chunk_fwd_h``.
    """
    _check_qkv(None, k, v)
    B, T, H, Dk = k.shape
    C = chunk_size
    n = -(-T // C)
    pad = n * C - T
    kc = rearrange(torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b n c h d", c=C)
    vc = rearrange(torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b n c h d", c=C)
    log_g = retention_log_decay(H, k.device)
    to_end = torch.exp((C - 1 - torch.arange(C, device=k.device, dtype=torch.float32))[:, None] * log_g)
    local = torch.einsum("bnchk,ch,bnchv->bnhkv", kc, to_end, vc)  # each chunk's own contribution
    gamma_c = torch.exp(C * log_g)[None, :, None, None]
    S = (k.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32) if initial_state is None
         else initial_state.float())
    h = []
    for c in range(n):
        h.append(S)
        S = gamma_c * S + local[:, c]
    return torch.stack(h, dim=1)


@without_autocast
def states_at_positions(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        h: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """``S_t`` for ``t`` in ``positions`` (``[B, K]`` or ``[K]``): ``[B, K, H, Dk, Dv]`` float32.

    From the chunk-entry states ``h`` (computed when not given) plus the in-chunk correction
    ``S_t = gamma^(t-s+1) h[t // C] + sum_{i=s..t} gamma^(t-i) k_i^T v_i`` with ``s = C * (t // C)``.
    """
    _check_qkv(None, k, v)
    B, T, H, _ = k.shape
    C = chunk_size
    positions = _as_batch_positions(positions, B, T).to(k.device)
    if h is None:
        h = chunk_states(k, v, C, initial_state)
    chunk = positions // C
    start = chunk * C
    log_g = retention_log_decay(H, k.device)
    b_idx = torch.arange(B, device=k.device)[:, None]
    entry = h[b_idx, chunk].float()  # [B, K, H, Dk, Dv]
    idx = start[..., None] + torch.arange(C, device=k.device)  # [B, K, C]
    lag = (positions[..., None] - idx).float()
    w = torch.exp(lag[..., None] * log_g) * (lag >= 0)[..., None]  # [B, K, C, H]
    idx = idx.clamp_max(T - 1)
    kk = k[b_idx[..., None], idx].float()  # [B, K, C, H, Dk]
    vv = v[b_idx[..., None], idx].float()
    carry = torch.exp((positions - start + 1).float()[..., None] * log_g)[..., None, None]
    return carry * entry + torch.einsum("bkchd,bkch,bkche->bkhde", kk, w, vv)


@without_autocast
def chunk_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                 scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Output ``[B, T, H, Dv]`` of the chunked form given the chunk-entry states ``h [B, NC, H, Dk, Dv]``
    (from :func:`chunk_states`): exact quadratic form inside each chunk plus ``q`` reading ``h``."""
    _check_qkv(q, k, v)
    B, T, H, Dk = q.shape
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    n = h.shape[1]
    pad = n * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return rearrange(x, "b (n c) h d -> b n c h d", c=C)

    qc, kc, vc = chunks(q) * scale, chunks(k), chunks(v)
    log_g = retention_log_decay(H, q.device)
    i = torch.arange(C, device=q.device, dtype=torch.float32)
    lag = i[:, None] - i[None, :]
    intra_decay = torch.exp(lag[None] * log_g[:, None, None]) * (lag >= 0)  # [H, C, C]
    scores = torch.einsum("bnihd,bnjhd->bnhij", qc, kc) * intra_decay
    o = torch.einsum("bnhij,bnjhv->bnihv", scores, vc)
    from_entry = torch.exp((i + 1)[:, None] * log_g)  # [C, H]
    o = o + torch.einsum("bnihd,ih,bnhdv->bnihv", qc, from_entry, h.float())
    return rearrange(o, "b n c h v -> b (n c) h v")[:, :T].to(q.dtype)


@without_autocast
def chunk_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form: :func:`chunk_states`, then :func:`chunk_output` (and the final state)."""
    _check_qkv(q, k, v)
    h = chunk_states(k, v, chunk_size, initial_state)
    o = chunk_output(q, k, v, h, scale, chunk_size)
    final = None
    if output_final_state:
        B, T = q.shape[:2]
        last = torch.full((B, 1), T - 1, dtype=torch.long, device=q.device)
        final = states_at_positions(k, v, last, h=h, chunk_size=chunk_size)[:, 0]
    return o, final


def _as_batch_positions(positions: torch.Tensor | list[int], batch: int, length: int) -> torch.Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(batch, -1)
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions: expected [K] or [B={batch}, K], got shape {tuple(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= length):
        raise ValueError(f"positions: expected values in [0, {length - 1}], got min {int(positions.min())} "
                         f"and max {int(positions.max())}")
    return positions
