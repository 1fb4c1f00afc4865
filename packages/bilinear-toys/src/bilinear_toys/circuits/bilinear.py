"""Bilinear MLP circuits: interaction matrices, their eigendecomposition, truncation and effective rank.

The MLP output along a direction ``u`` [d] is a quadratic form of its input: ``u . P((L x) * (R x)) =
x^T B_u x`` with ``B_u[a, b] = sum_n (W_P[n] . u) W_L[a, n] W_R[b, n]``; only its symmetric part
``(B_u + B_u^T) / 2`` matters. Its eigenvectors are input directions whose square drives the output.
"""

from __future__ import annotations

import math

import torch

from bilinear_toys.circuits._common import check_layer
from bilinear_toys.models.toy_transformer import ToyTransformer


def interaction_matrices(model: ToyTransformer, layer: int, outputs: torch.Tensor) -> torch.Tensor:
    """[K, d, d] symmetric ``B_u`` for output directions ``outputs`` [K, d] (or [d]) in the residual
    stream; for token logits pass ``model.W_U[:, ids].T``."""
    check_layer(model, layer)
    u = outputs[None] if outputs.ndim == 1 else outputs
    w_l, w_r, w_p = model.W_L[layer], model.W_R[layer], model.W_P[layer]
    coef = u.to(w_p.dtype) @ w_p.T  # [K, n]
    b = torch.einsum("an,kn,bn->kab", w_l, coef, w_r)
    return (b + b.transpose(-1, -2)) / 2


def token_interaction_matrices(model: ToyTransformer, layer: int, token_ids: torch.Tensor | list[int]
                               ) -> torch.Tensor:
    """[K, d, d]: interaction matrices for the logits of ``token_ids`` (unembedding directions)."""
    ids = torch.as_tensor(token_ids, device=model.W_U.device)
    return interaction_matrices(model, layer, model.W_U[:, ids].T)


def interaction_eigen(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigvals [..., d], eigvecs [..., d, d])`` sorted by decreasing ``|lambda|`` (columns are vectors)."""
    vals, vecs = torch.linalg.eigh(b.double())
    order = vals.abs().argsort(dim=-1, descending=True)
    return vals.gather(-1, order), vecs.gather(-1, order[..., None, :].expand_as(vecs))


def truncation_curve(b: torch.Tensor, inputs: torch.Tensor, ks: list[int] | None = None
                     ) -> tuple[list[int], torch.Tensor]:
    """Relative squared error of the outputs ``x^T B x`` when ``B`` keeps only its top-k eigenvectors.

    b [K, d, d], inputs [N, d] (e.g. residual activations or embeddings) -> ``(ks, err [len(ks), K])``
    with ``err = sum_x (y_k - y)^2 / sum_x y^2``; ``err`` reaches 0 at ``k = d``.
    """
    b = b[None] if b.ndim == 2 else b
    vals, vecs = interaction_eigen(b)
    d = b.shape[-1]
    ks = list(range(d + 1)) if ks is None else ks
    proj = torch.einsum("nd,kde->kne", inputs.double(), vecs).square()  # [K, N, d]: (x . v_i)^2
    terms = proj * vals[:, None, :]
    exact = terms.sum(-1)
    cum = torch.cat([torch.zeros_like(terms[..., :1]), terms.cumsum(-1)], dim=-1)  # [K, N, d + 1]
    denom = exact.square().sum(-1).clamp_min(1e-30)
    err = torch.stack([(cum[..., min(k, d)] - exact).square().sum(-1) / denom for k in ks])
    return ks, err.float()


def effective_rank(eigvals: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of ``p_i = lambda_i^2 / sum lambda^2`` over the last dim (1 for rank one, d for a
    flat spectrum)."""
    p = eigvals.double().square()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return ent.exp().float()


def rank_for_fraction(eigvals: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """Smallest k whose top-k ``lambda^2`` hold ``fraction`` of the total (eigvals sorted by ``|lambda|``)."""
    if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction={fraction}: expected a value in (0, 1]")
    p = eigvals.double().square()
    cum = p.cumsum(-1) / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return (cum < fraction - 1e-12).sum(-1) + 1
