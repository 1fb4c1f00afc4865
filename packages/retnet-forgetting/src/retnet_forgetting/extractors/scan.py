"""Chunked scans of matrix-valued linear recurrences, and states at any positions, in pure PyTorch.

Layout as in fla: ``q, k: [B, T, H, Dk]``, ``v: [B, T, H, Dv]``, states ``S: [B, H, Dk, Dv]``; decays are
log-decays ``log_a: [B, T, H, Dk]`` (per key channel, GLA) or ``[B, T, H, 1]`` (one per head and token:
Mamba-2, gated DeltaNet). Two state updates are covered; the state "at position t" includes token t:

- decayed outer products (RetNet, GLA, Mamba-2): ``S_t = diag(a_t) S_{t-1} + k_t^T u_t``;
- the (gated) delta rule (DeltaNet, Gated DeltaNet):
  ``S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``. Writing it as
  ``S_t = a_t S_{t-1} + k_t^T u_t`` with the pseudo-value ``u_t = beta_t (v_t - a_t k_t S_{t-1})`` turns it
  into the first form; inside a chunk the ``u`` solve a unit lower-triangular system (the UT/WY form):
  ``(I + L) U = diag(beta) (V - diag(g) K S_0)``, ``L[i, j] = beta_i (g_i / g_j) k_i . k_j`` for ``j < i``,
  with ``g_i`` the decay accumulated since the chunk start ``S_0``.

So both reduce to "chunk-entry states + an in-chunk correction": ``S_t = G_t S_c + sum_{i=s..t} (G_t / G_i)
k_i^T u_i`` where ``s`` is the chunk start and ``G`` the decay accumulated inside the chunk. All decays are
taken relative to the chunk (differences of in-chunk cumulative log-decays, never ``exp`` of a positive
number), and everything runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

DEFAULT_CHUNK_SIZE = 64


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """``[B, T, ...]`` -> ``[B, n, C, ...]`` fp32, zero-padded at the end."""
    pad = -x.shape[1] % C
    x = F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, pad))
    return rearrange(x, "b (n c) ... -> b n c ...", c=C)


def _check(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor | None) -> None:
    if k.dim() != 4 or u.dim() != 4 or k.shape[:3] != u.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(u.shape)}: expected [B, T, H, Dk] and [B, T, H, Dv]")
    if log_a is not None and (log_a.shape[:3] != k.shape[:3] or log_a.shape[3] not in (1, k.shape[3])):
        raise ValueError(f"log_a {tuple(log_a.shape)}: expected [B, T, H, Dk] or [B, T, H, 1] "
                         f"for k {tuple(k.shape)}")


def _zero_state(k: torch.Tensor, u: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    B, _, H, Dk = k.shape
    if initial_state is None:
        return torch.zeros(B, H, Dk, u.shape[-1], device=k.device, dtype=torch.float32)
    return initial_state.float()


def chunk_entry_states(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, initial_state: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decayed outer products: (``h [B, n, H, Dk, Dv]`` the state entering each chunk, final state
    ``[B, H, Dk, Dv]``), fp32, ``n = ceil(T / chunk_size)``."""
    _check(k, u, log_a)
    kc, uc = _chunks(k, chunk_size), _chunks(u, chunk_size)
    cum = _chunks(log_a, chunk_size).cumsum(2)  # [B, n, C, H, Dk or 1]
    total = cum[:, :, -1]  # log-decay over the whole chunk
    local = torch.einsum("bnchk,bnchv->bnhkv", kc * torch.exp(total[:, :, None] - cum), uc)
    S = _zero_state(k, u, initial_state)
    h = []
    for c in range(kc.shape[1]):
        h.append(S)
        S = torch.exp(total[:, c])[..., None] * S + local[:, c]
    return torch.stack(h, dim=1), S


def delta_chunk_scan(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_a: torch.Tensor | None = None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, initial_state: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Gated) delta rule in chunks: (pseudo-values ``u [B, T, H, Dv]``, chunk-entry states
    ``h [B, n, H, Dk, Dv]``, final state), fp32. ``beta [B, T, H]``, ``log_a [B, T, H, 1]`` or None (no gate).

    With ``u``, the state at any position is :func:`states_at_positions` ``(k, u, log_a, ..., h)``.
    """
    _check(k, v, log_a)
    if log_a is not None and log_a.shape[-1] != 1:
        raise ValueError(f"log_a {tuple(log_a.shape)}: the delta rule takes one decay per head, [B, T, H, 1]")
    B, T, H, _ = k.shape
    C = chunk_size
    log_a = torch.zeros(B, T, H, 1, device=k.device) if log_a is None else log_a
    kc = rearrange(_chunks(k, C), "b n c h d -> b n h c d")
    vc = rearrange(_chunks(v, C), "b n c h d -> b n h c d")
    bc = rearrange(_chunks(beta[..., None], C), "b n c h 1 -> b n h c")
    cum = rearrange(_chunks(log_a, C).cumsum(2), "b n c h 1 -> b n h c")
    below = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    rel = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~below, float("-inf")))  # g_i / g_j
    L = bc[..., None] * rel * (kc @ kc.transpose(-1, -2))  # [B, n, H, C, C], strictly lower
    eye = torch.eye(C, device=k.device)
    to_end = torch.exp(cum[..., -1:] - cum)  # [B, n, H, C]
    S = _zero_state(k, v, initial_state)
    h, us = [], []
    for c in range(kc.shape[1]):
        h.append(S)
        rhs = bc[:, c, ..., None] * (vc[:, c] - torch.exp(cum[:, c])[..., None] * (kc[:, c] @ S))
        u = torch.linalg.solve_triangular(eye + L[:, c], rhs, upper=False, unitriangular=True)
        S = torch.exp(cum[:, c, :, -1])[..., None, None] * S + (kc[:, c] * to_end[:, c, ..., None]).transpose(
            -1, -2) @ u
        us.append(u)
    u = rearrange(torch.stack(us, dim=1), "b n h c d -> b (n c) h d")[:, :T]
    return u, torch.stack(h, dim=1), S


def states_at_positions(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor, positions: torch.Tensor,
                        h: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``S_t`` for ``positions [B, K]`` from the chunk-entry states ``h``: ``[B, K, H, Dk, Dv]`` fp32.

    ``S_t = G_t h[t // C] + sum_{i=s..t} (G_t / G_i) k_i^T u_i``, ``s = C (t // C)``, at most ``C`` terms.
    """
    _check(k, u, log_a)
    B, T = k.shape[:2]
    C = chunk_size
    chunk = positions // C
    idx = chunk[..., None] * C + torch.arange(C, device=k.device)  # [B, K, C]
    valid = (idx <= positions[..., None])[..., None, None]
    b = torch.arange(B, device=k.device)[:, None, None]
    idx = idx.clamp_max(T - 1)
    la = log_a[b, idx].float().masked_fill(~valid, 0.0)  # [B, K, C, H, Dk or 1]
    cum = la.cumsum(2)
    last = cum[:, :, -1]  # = cumulative log-decay at t (invalid terms add 0)
    w = torch.exp(last[:, :, None] - cum).masked_fill(~valid, 0.0)
    entry = h[b[..., 0], chunk]  # [B, K, H, Dk, Dv]
    corr = torch.einsum("bkchd,bkche->bkhde", k[b, idx].float() * w, u[b, idx].float())
    return torch.exp(last)[..., None] * entry + corr


def chunk_output(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor, h: torch.Tensor,
                 scale: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``o_t = scale * q_t S_t`` for every t from the chunk-entry states: ``[B, T, H, Dv]`` fp32."""
    T = q.shape[1]
    qc, kc, uc = _chunks(q, chunk_size) * scale, _chunks(k, chunk_size), _chunks(u, chunk_size)
    cum = _chunks(log_a, chunk_size).cumsum(2)  # [B, n, C, H, Dk or 1]
    o = torch.einsum("bnchk,bnhkv->bnchv", qc * torch.exp(cum), h)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()[..., None, None]
    rel = torch.exp((cum[:, :, :, None] - cum[:, :, None]).masked_fill(~causal, float("-inf")))  # t, i
    scores = torch.einsum("bnthk,bnihk,bntihk->bnhti", qc, kc, rel.expand(-1, -1, -1, -1, -1, kc.shape[-1]))
    o = o + torch.einsum("bnhti,bnihv->bnthv", scores, uc)
    return rearrange(o, "b n c h v -> b (n c) h v")[:, :T]


def recurrent_scan(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None,
                   beta: torch.Tensor | None = None, scale: float = 1.0,
                   initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token-by-token reference (the oracle): ``(o [B, T, H, Dv] or None, final state [B, H, Dk, Dv])``.

    ``beta`` None: decayed outer products; else the (gated) delta rule. ``log_a`` None: no decay.
    """
    S = _zero_state(k, v, initial_state)
    outs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()
        if log_a is not None:
            S = torch.exp(log_a[:, t].float())[..., None] * S
        if beta is not None:
            vt = beta[:, t].float()[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., None] * vt[..., None, :]
        if q is not None:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float() * scale, S))
    return (torch.stack(outs, 1) if q is not None else None), S
