"""Dual form of test-time learning for MLP memories (no per-chunk weight tensors).

Memory ``M(x) = [x +] LN(z_D) * (gamma + 1)`` (the ``+``/LN part only with the ResidualNorm wrapper),
``z_1 = x W_1``, ``z_l = gelu(z_{l-1}) W_l``. All surprises of a segment are taken at the segment's
starting weights, so the gradient of token t for matrix l is ``x_t^(l) outer delta_t^(l)`` (layer input,
gradient at layer output) and of gamma a vector ``g_t``. The weights after chunk r are a linear
combination ``W_r = sum_s c[r, s] S_s + sum_t kappa[r, t] x_t^T delta_t`` of the carried states ``S_s``
(last weights, momenta) and those rank-one terms, so a query ``a`` gets
``a W_r = sum_s c[r, s] (a S_s) + ((a X^T) * kappa[r]) Delta``: attention-like batched matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2PI = math.sqrt(2 * math.pi)


def gelu_grad(z: Tensor) -> Tensor:
    """d gelu(z) / dz for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cdf + z * torch.exp(-0.5 * z * z) / _SQRT_2PI


def layer_norm_backward(dn: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through ``n = (z - mean) * rstd`` (no affine) given dL/dn."""
    return rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))


def normalize(z: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(layer-normed z, 1/std) over the last axis, as ``F.layer_norm`` without affine."""
    var, mean = torch.var_mean(z, dim=-1, keepdim=True, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    return (z - mean) * rstd, rstd


def mlp_store_grads(
    weights: list[Tensor], gamma: Tensor | None, keys: Tensor, values: Tensor
) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor]:
    """Per-token gradients of ``mean_d (M(k_t) - v_t)^2`` at ``weights``.

    weights: matrices [bh, i_l, o_l]; gamma [bh, d] or None (no ResidualNorm); keys/values [bh, T, d].
    Returns (layer inputs X_l [bh, T, i_l], output grads Delta_l [bh, T, o_l], gamma grads [bh, T, d]
    or None, unweighted loss [bh, T]); grad of W_l for token t is ``X_l[t]^T Delta_l[t]``.
    """
    inputs, pre = [], []
    a = keys
    for i, w in enumerate(weights):
        if i:
            a = F.gelu(pre[-1])
        inputs.append(a)
        pre.append(a @ w)
    z = pre[-1]
    if gamma is not None:
        n, rstd = normalize(z)
        scale = gamma.unsqueeze(1) + 1.0
        pred = n * scale + keys
    else:
        pred = z
    diff = pred - values
    loss = diff.pow(2).mean(-1)
    dy = diff * (2.0 / diff.shape[-1])
    gamma_grad = None
    if gamma is not None:
        gamma_grad = dy * n
        dz = layer_norm_backward(dy * scale, n, rstd)
    else:
        dz = dy
    deltas = [dz]
    for i in range(len(weights) - 1, 0, -1):
        dz = (dz @ weights[i].transpose(-1, -2)) * gelu_grad(pre[i - 1])
        deltas.insert(0, dz)
    return inputs, deltas, gamma_grad, loss


def chunk_grad_norms(x: Tensor, delta: Tensor | None, coef: Tensor, chunk: int) -> Tensor:
    """Frobenius norm per chunk of ``sum_t coef_t x_t^T delta_t`` (or ``sum_t coef_t x_t`` if delta None).

    x [bh, T, i], delta [bh, T, o], coef [bh, T]; returns [bh, T // chunk]. Uses chunk-local Gram
    matrices, never the gradient itself.
    """
    bh, t = coef.shape
    xc = (x * coef.unsqueeze(-1)).reshape(bh, t // chunk, chunk, -1)
    if delta is None:
        return xc.sum(2).norm(dim=-1)
    dc = delta.reshape(bh, t // chunk, chunk, -1)
    gram = (xc @ xc.transpose(-1, -2)) * (dc @ dc.transpose(-1, -2))
    return gram.sum((-1, -2)).clamp(min=0).sqrt()


def dual_matmul(
    a: Tensor, state_coef: Tensor, states: Tensor, x: Tensor, delta: Tensor, kappa: Tensor
) -> Tensor:
    """``a_p W_{r(p)}`` for W in dual form.

    a [bh, P, i]; state_coef [bh, P, S]; states [bh, S, i, o]; x [bh, T, i]; delta [bh, T, o];
    kappa [bh, P, T] (token coefficients of each query's row). Returns [bh, P, o].
    """
    base = torch.einsum("bps,bpso->bpo", state_coef, torch.einsum("bpi,bsio->bpso", a, states))
    return base + ((a @ x.transpose(-1, -2)) * kappa) @ delta


def dual_vector(state_coef: Tensor, states: Tensor, g: Tensor, kappa: Tensor) -> Tensor:
    """``v_{r(p)}`` for a vector parameter in dual form: states [bh, S, d], g [bh, T, d] -> [bh, P, d]."""
    return state_coef @ states + kappa @ g


def mlp_dual_retrieve(
    queries: Tensor,
    residual_norm: bool,
    state_coef: Tensor,
    states: list[Tensor],
    gamma_states: Tensor | None,
    inputs: list[Tensor],
    deltas: list[Tensor],
    gamma_grad: Tensor | None,
    kappas: list[Tensor],
    gamma_kappa: Tensor | None,
) -> Tensor:
    """Memory output for queries [bh, P, d] at each query's own weights (dual form), [bh, P, d]."""
    a = queries
    for i, (s, x, dl, k) in enumerate(zip(states, inputs, deltas, kappas)):
        a = dual_matmul(F.gelu(a) if i else a, state_coef, s, x, dl, k)
    if not residual_norm:
        return a
    gamma = dual_vector(state_coef, gamma_states, gamma_grad, gamma_kappa)
    return normalize(a)[0] * (gamma + 1.0) + queries


def token_coefficients(chunk_coef: Tensor, factor: Tensor | None, lr: Tensor) -> Tensor:
    """[bh, R, N] chunk coefficients -> [bh, R, T] token coefficients of ``u_t = -lr_t grad_t``.

    factor [bh, N] (per-chunk gradient scale) or None; lr [bh, T] with T a multiple of N (items per chunk
    contiguous). No gather: chunk m's coefficient is repeated over its T / N items.
    """
    if factor is not None:
        chunk_coef = chunk_coef * factor.unsqueeze(1)
    bh, r, n = chunk_coef.shape
    per = lr.shape[-1] // n
    return chunk_coef.unsqueeze(-1).expand(bh, r, n, per).reshape(bh, r, n * per) * -lr.unsqueeze(1)


def token_coefficients_per_factor(
    chunk_coef: Tensor, factors: list[Tensor | None], lr: Tensor
) -> list[Tensor]:
    """:func:`token_coefficients` for each factor; parameters without a factor share one tensor."""
    shared = None
    out = []
    for f in factors:
        if f is None:
            shared = token_coefficients(chunk_coef, None, lr) if shared is None else shared
            out.append(shared)
        else:
            out.append(token_coefficients(chunk_coef, f, lr))
    return out


def mlp_dual_read(
    queries: Tensor,
    rows: Tensor,
    state_coef: Tensor,
    chunk_coef: Tensor,
    lr: Tensor,
    factors: list[Tensor | None],
    states: list[Tensor],
    gamma_states: Tensor | None,
    inputs: list[Tensor],
    deltas: list[Tensor],
    gamma_grad: Tensor | None,
) -> Tensor:
    """Queries [bh, P, d] read at rows [P] of a stored split in dual form, [bh, P, d].

    state_coef [bh, R, S] / chunk_coef [bh, R, N]: each row's coefficients on the carried states and on
    the chunk surprises; lr [bh, T]; factors: per-chunk gradient scales [bh, N] (or None) of each matrix,
    then of gamma when ``gamma_states`` is given. The one function the ``compile`` option compiles.
    """
    kappas = token_coefficients_per_factor(chunk_coef[:, rows], factors, lr)
    residual_norm = gamma_states is not None
    return mlp_dual_retrieve(
        queries,
        residual_norm,
        state_coef[:, rows],
        states,
        gamma_states,
        inputs,
        deltas,
        gamma_grad,
        kappas[: len(states)],
        kappas[-1] if residual_norm else None,
    )


def dual_materialize(
    state_coef: Tensor, states: Tensor, x: Tensor | None, g: Tensor, kappa: Tensor
) -> Tensor:
    """Weights in dual form as tensors: state_coef [bh, R, S], states [bh, S, *F], kappa [bh, R, T],
    x [bh, T, i] (None for vectors), g [bh, T, o] -> [bh, R, *F]."""
    base = torch.einsum("brs,bs...->br...", state_coef, states)
    if x is None:
        return base + kappa @ g
    return base + torch.einsum("brt,bti,bto->brio", kappa, x, g)
