"""Quadratic attention as linear attention: ``(q . k)^2 = <q (x) q, k (x) k>``.

With the feature map ``phi(x) = vec(x x^T)`` (D^2 features), causal quadratic attention is causal linear
attention with the state ``S_t = sum_{j <= t} phi(k_j) v_j^T`` of shape [D^2, Dv] and output
``z_t = scale^2 * phi(q_t) S_t``. Two forms over it:

- :func:`quadratic_attention_chunked`: chunks of C tokens; inside a chunk the masked O(C^2) form, across
  chunks the state (O(T * D^2 * Dv) time, O(D^2 * Dv) memory, no T x T matrix);
- :func:`quadratic_attention_chunkwise`: the same sums with every chunk at once (batched matmuls and a
  cumulative sum of the per-chunk state increments, no Python loop over chunks): O(T/C * D^2 * Dv) memory
  for the chunk states, and the form whose autograd is fast (used by the Triton path's backward);
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


def quadratic_attention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: float | None = None, chunk_size: int = 64,
                                  initial_state: torch.Tensor | None = None,
                                  output_final_state: bool = False,
                                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`quadratic_attention_chunked`, all chunks at once.

    With N = ceil(T / C) chunks (T zero-padded to N C: zero keys and values add nothing), per chunk c:
    ``dS_c = phi(K_c)^T V_c`` [D^2, Dv], ``S_c = S_0 + sum_{c' < c} dS_c'`` (an exclusive cumulative sum
    over chunks, kept in at least fp32), ``Z_c = (mask * (scale Q_c K_c^T)^2) V_c + scale^2 phi(Q_c) S_c``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected a positive integer")
    b, t, h, d = q.shape
    scale = 1.0 / d if scale is None else scale
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    qc, kc, vc = (rearrange(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)),
                            "b (n c) h d -> b h n c d", c=chunk_size) for x in (q, k, v))
    intra = (qc @ kc.transpose(-1, -2) * scale).square() * causal_mask(chunk_size, chunk_size, q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    delta = (outer_features(kc).transpose(-1, -2) @ vc).to(acc)  # [b, h, n, D^2, Dv]
    states = torch.cat([torch.zeros_like(delta[:, :, :1]), delta[:, :, :-1].cumsum(dim=2)], dim=2)
    if initial_state is not None:  # the running sums stay fp32 whatever the input dtype
        states = states + initial_state.to(acc)[:, :, None]
    z = intra @ vc + (outer_features(qc) @ states.to(qc.dtype)) * scale**2
    z = rearrange(z, "b h n c e -> b (n c) h e")[:, :t]
    if not output_final_state:
        return z
    final = states[:, :, -1] + delta[:, :, -1]
    return z, final.to(q.dtype)


def quadratic_attention_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: state [B, H, D*D, Dv], q, k [B, H, D], v [B, H, Dv] -> (z [B, H, Dv], new state)."""
    scale = 1.0 / q.shape[-1] if scale is None else scale
    state = state + outer_features(k)[..., :, None] * v[..., None, :]
    z = einsum(outer_features(q), state, "b h f, b h f e -> b h e") * scale**2
    return z, state
