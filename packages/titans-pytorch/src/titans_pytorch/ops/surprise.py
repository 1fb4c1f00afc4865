"""Turning per-chunk surprises into memory weights: soft clamping, momentum, decay, spectral norm.

All recurrences here are linear with scalar gates per (batch*head, chunk), so the same code runs on
materialised weight tensors (the reference path) and on coefficient bases (the dual form).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .assoc_scan import assoc_scan


def softclamp_max(t: Tensor, max_value: float) -> Tensor:
    """Map [0, inf) smoothly into [max/2, max): ``tanh(2t/max) * max/2 + max/2``."""
    half = max_value / 2
    return (t / half).tanh() * half + half


def softclamp_factor(norm: Tensor, max_value: float) -> Tensor:
    """Scale that gives a gradient of norm ``norm`` the soft-clamped norm; 1 where ``norm`` is 0.

    (titans-pytorch divides by the norm unguarded, which turns zero gradients into NaN.)
    """
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, softclamp_max(norm, max_value) / safe, torch.ones_like(norm))


def newtonschulz5(
    t: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    coefs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
) -> Tensor:
    """Approximate orthogonalisation of the trailing matrices of [bh, n, i, j]; vectors pass through."""
    if t.ndim <= 3:
        return t
    transpose = t.shape[-2] > t.shape[-1]
    if transpose:
        t = t.transpose(-1, -2)
    t = t / t.norm(dim=(-1, -2), keepdim=True).clamp(min=eps)
    a, b, c = coefs
    for _ in range(steps):
        gram = t @ t.transpose(-1, -2)
        t = a * t + (b * gram + c * gram @ gram) @ t
    return t.transpose(-1, -2) if transpose else t


def _gate(g: Tensor, like: Tensor) -> Tensor:
    """[bh, n] or [bh, n, 1] gate -> broadcastable against [bh, n, *F]."""
    g = g.reshape(g.shape[0], g.shape[1])
    return g.reshape(*g.shape, *(1,) * (like.ndim - 2))


def momentum_decay_recurrence(
    surprise: Tensor,
    last_update: Tensor,
    last_momentum: Tensor | None,
    decay: Tensor,
    momentum_gates: Tensor | None = None,
    combine: Tensor | None = None,
    combine_include_zeroth: bool = False,
    spectral_norm: bool = False,
    scan_backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Weights after each chunk from the surprises ``u_m`` (= -lr-weighted gradients) of one segment.

    surprise [bh, n, *F]; last_update [bh, *F] (W before the segment); last_momentum [o, bh, *F];
    decay [bh, n(, 1)] (alpha); momentum_gates [o, bh, n(, 1)] (eta per order); combine [o', bh, n]
    (softmax weights over orders, plus the raw surprise first when ``combine_include_zeroth``).

    ``S^(1)_m = eta1_m S^(1)_{m-1} + u_m``, ``S^(k)_m = etak_m S^(k)_{m-1} + S^(k-1)_m``,
    update = last order (or the learned combination), ``W_m = (1 - alpha_m) W_{m-1} + update_m``.
    Returns (rows [bh, n + 1, *F] with ``rows[:, 0] = last_update``, next momentum [o, bh, *F] or None).
    """
    update, next_momentum = surprise, None
    if momentum_gates is not None:
        orders, mom = [], surprise
        for eta, prev in zip(momentum_gates, last_momentum):
            mom = assoc_scan(_gate(eta, mom), mom, prev, backend=scan_backend)
            orders.append(mom)
        next_momentum = torch.stack([m[:, -1] for m in orders])
        if combine is None:
            update = orders[-1]
        else:
            stacked = torch.stack(([surprise] if combine_include_zeroth else []) + orders)
            weights = combine.reshape(*combine.shape, *(1,) * (surprise.ndim - 2))
            update = (stacked * weights).sum(0)
    if spectral_norm:
        update = newtonschulz5(update)
    weights = assoc_scan(_gate(1.0 - decay, update), update, last_update, backend=scan_backend)
    return torch.cat((last_update.unsqueeze(1), weights), dim=1), next_momentum


def segment_products(gates: Tensor) -> tuple[Tensor, Tensor]:
    """For gates a [bh, n]: (P [bh, n, n] with ``P[m, j] = prod_{j < i <= m} a_i`` for j <= m else 0,
    v [bh, n] with ``v[m] = prod_{i <= m} a_i``), via log-space cumulative sums (gates in (0, 1])."""
    logs = torch.cumsum(torch.log(gates.clamp(min=1e-30)), dim=-1)
    diff = logs.unsqueeze(-1) - logs.unsqueeze(-2)
    causal = torch.ones(gates.shape[-1], gates.shape[-1], dtype=torch.bool, device=gates.device).tril()
    return torch.where(causal, diff, float("-inf")).exp(), logs.exp()


def recurrence_coefficients(
    num_chunks: int,
    decay: Tensor,
    momentum_gates: Tensor | None = None,
    combine: Tensor | None = None,
    combine_include_zeroth: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`momentum_decay_recurrence` (without spectral norm) in closed form, on the coefficient basis.

    Basis columns: 0..N-1 the chunk surprises, N the carried weights, N+1+o the carried momentum of order
    o. Returns (rows [bh, N + 1, K]: weights before/after each chunk, momenta [o, bh, K] after the last
    chunk) such that ``W_r = sum_k rows[r, k] basis_k``. Gates: decay [bh, N(, 1)], momentum_gates
    [o, bh, N(, 1)], combine [o', bh, N].
    """
    n = num_chunks
    decay = decay.reshape(decay.shape[0], n)
    bh, orders = decay.shape[0], 0 if momentum_gates is None else momentum_gates.shape[0]
    size = n + 1 + orders
    eye = torch.eye(size, dtype=decay.dtype, device=decay.device)
    surprises = eye[:n].expand(bh, n, size)  # chunk m's surprise is basis column m
    update, momenta = surprises, None
    if orders:
        mom, per_order = surprises, []
        for o in range(orders):
            p, v = segment_products(momentum_gates[o].reshape(bh, n))
            mom = p @ mom + v.unsqueeze(-1) * eye[n + 1 + o]
            per_order.append(mom)
        momenta = torch.stack([m[:, -1] for m in per_order])
        if combine is None:
            update = per_order[-1]
        else:
            stacked = torch.stack(([surprises] if combine_include_zeroth else []) + per_order)
            update = (stacked * combine.unsqueeze(-1)).sum(0)
    p, v = segment_products(1.0 - decay)
    rows = p @ update + v.unsqueeze(-1) * eye[n]
    return torch.cat((eye[n].expand(bh, 1, size), rows), dim=1), momenta
