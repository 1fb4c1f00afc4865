"""Quadratic attention as linear attention: ``(q . k)^2 = <q (x) q, k (x) k>``.

With the feature map ``phi(x) = vec(x x^T)`` (D^2 features), causal quadratic attention is causal linear
attention with the state ``S_t = sum_{j <= t} phi(k_j) v_j^T`` of shape [D^2, Dv] and output
``z_t = scale^2 * phi(q_t) S_t``. Two forms over it:

- :func:`quadratic_attention_chunked`: chunks of C tokens; inside a chunk the masked O(C^2) form, across
  chunks the state (O(T * D^2 * Dv) time, O(D^2 * Dv) memory, no T x T matrix);
- :func:`quadratic_attention_step`: one token at a time from a state (decoding).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from bilinear_toys.ops.quadratic_attention.reference import causal_mask


def outer_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = vec(x x^T)``: [..., D] -> [..., D * D]."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def quadratic_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None, chunk_size: int = 64,
                                initial_state: torch.Tensor | None = None,
                                output_final_state: bool = False,
                                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, T, H, D], v [B, T, H, Dv] -> z [B, T, H, Dv] (and the state [B, H, D*D, Dv] after T).

    ``initial_state`` [B, H, D*D, Dv] continues a previous segment. Equals the masked form exactly (up
    to floating-point reassociation).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected a positive integer")
    b, t, h, d = q.shape
    scale = 1.0 / d if scale is None else scale
    qh, kh, vh = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))
    state = (qh.new_zeros(b, h, d * d, v.shape[-1]) if initial_state is None
             else initial_state.to(qh.dtype))
    outs = []
    for start in range(0, t, chunk_size):
        qc, kc, vc = (x[:, :, start:start + chunk_size] for x in (qh, kh, vh))
        c = qc.shape[2]
        intra = (einsum(qc, kc, "b h i d, b h j d -> b h i j") * scale).square()
        intra = intra * causal_mask(c, c, q.device)
        out = einsum(intra, vc, "b h i j, b h j e -> b h i e")
        out = out + einsum(outer_features(qc), state, "b h i f, b h f e -> b h i e") * scale**2
        state = state + einsum(outer_features(kc), vc, "b h j f, b h j e -> b h f e")
        outs.append(out)
    z = rearrange(torch.cat(outs, dim=2), "b h t e -> b t h e")
    return (z, state) if output_final_state else z


def quadratic_attention_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: state [B, H, D*D, Dv], q, k [B, H, D], v [B, H, Dv] -> (z [B, H, Dv], new state)."""
    scale = 1.0 / q.shape[-1] if scale is None else scale
    state = state + outer_features(k)[..., :, None] * v[..., None, :]
    z = einsum(outer_features(q), state, "b h f, b h f e -> b h e") * scale**2
    return z, state
