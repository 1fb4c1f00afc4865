"""The model as tensor networks (quimb over torch tensors), and the proof that they are exact.

Each polynomial component is one network of its weight tensors and copies of its input ``x`` [B, T, d];
indices shared by more than two tensors (batch ``b``, positions ``i``/``j``, head ``h``, hidden ``n``) are
hyper-indices. Quadratic attention ``sum_h sum_{j<=i} (q_i . k_j / dh)^2 v_j W_O`` is two copies of the
score network (one per factor of the square), the causal mask ``M[i, j] / dh^2``, and the value path:

    x[b,i,a] W_Q[h,a,e] R[i,r,e]   x[b,j,c] W_K[h,c,f] R[j,r,f]     (first score factor)
    x[b,i,a'] W_Q[h,a',e'] R[i,r',e']  x[b,j,c'] W_K[h,c',f'] R[j,r',f']  (second factor)
    M[i,j]   x[b,j,g] W_V[h,g,v] W_O[h,v,o]              ->  out[b,i,o]

The bilinear MLP is ``x[b,i,a] W_L[a,n] x[b,i,c] W_R[c,n] W_P[n,o]``. :func:`logits_from_network`
contracts embedding, every component and the unembedding in turn (the residual stream is the sum of
their outputs) and must equal ``model(tokens)``.
"""

from __future__ import annotations

import torch

from bilinear_toys.circuits._common import quimb_tensor, require_polynomial
from bilinear_toys.models.rope import rope_matrix
from bilinear_toys.models.toy_transformer import ToyTransformer


def _position_rotations(model: ToyTransformer, t: int, like: torch.Tensor) -> torch.Tensor:
    """[T, dh, dh]: RoPE at each position (identity without RoPE)."""
    dh = model.config.d_head
    if not model.config.use_rope:
        return torch.eye(dh, dtype=like.dtype, device=like.device).expand(t, dh, dh)
    return rope_matrix(torch.arange(t, device=like.device), dh, model.config.rope_base).to(like.dtype)


def attention_network(model: ToyTransformer, layer: int, x: torch.Tensor):
    """The quimb ``TensorNetwork`` of attention layer ``layer`` on input ``x`` [B, T, d]; output inds
    ``("b", "i", "o")``."""
    qtn = quimb_tensor()
    dt = x.dtype
    t = x.shape[1]
    w_q, w_k = model.W_Q[layer].to(dt), model.W_K[layer].to(dt)
    w_v, w_o = model.W_V[layer].to(dt), model.W_O[layer].to(dt)
    rot = _position_rotations(model, t, x)
    mask = torch.tril(torch.ones(t, t, dtype=dt, device=x.device)) / model.config.d_head**2
    tensors = [qtn.Tensor(mask, inds=("i", "j"), tags={"mask"})]
    for s in ("1", "2"):  # one copy of the score network per factor of the square
        tensors += [
            qtn.Tensor(x, inds=("b", "i", f"a{s}"), tags={"x", "query"}),
            qtn.Tensor(w_q, inds=("h", f"a{s}", f"e{s}"), tags={"W_Q"}),
            qtn.Tensor(rot, inds=("i", f"r{s}", f"e{s}"), tags={"RoPE"}),
            qtn.Tensor(x, inds=("b", "j", f"c{s}"), tags={"x", "key"}),
            qtn.Tensor(w_k, inds=("h", f"c{s}", f"f{s}"), tags={"W_K"}),
            qtn.Tensor(rot, inds=("j", f"r{s}", f"f{s}"), tags={"RoPE"}),
        ]
    tensors += [
        qtn.Tensor(x, inds=("b", "j", "g"), tags={"x", "value"}),
        qtn.Tensor(w_v, inds=("h", "g", "v"), tags={"W_V"}),
        qtn.Tensor(w_o, inds=("h", "v", "o"), tags={"W_O"}),
    ]
    return qtn.TensorNetwork(tensors)


def bilinear_network(model: ToyTransformer, layer: int, x: torch.Tensor):
    """The quimb ``TensorNetwork`` of the bilinear MLP of ``layer`` on ``x`` [B, T, d]; output
    ``("b", "i", "o")``."""
    qtn = quimb_tensor()
    dt = x.dtype
    return qtn.TensorNetwork([
        qtn.Tensor(x, inds=("b", "i", "a"), tags={"x"}),
        qtn.Tensor(model.W_L[layer].to(dt), inds=("a", "n"), tags={"W_L"}),
        qtn.Tensor(x, inds=("b", "i", "c"), tags={"x"}),
        qtn.Tensor(model.W_R[layer].to(dt), inds=("c", "n"), tags={"W_R"}),
        qtn.Tensor(model.W_P[layer].to(dt), inds=("n", "o"), tags={"W_P"}),
    ])


def _contract(tn, output_inds: tuple[str, ...]) -> torch.Tensor:
    out = tn.contract(output_inds=output_inds, optimize="greedy")
    return out.data if hasattr(out, "data") else out


@torch.no_grad()
def logits_from_network(model: ToyTransformer, tokens: torch.Tensor, dtype: torch.dtype = torch.float64
                        ) -> torch.Tensor:
    """tokens [B, T] -> logits [B, T, V] by contracting the model's networks (no forward pass)."""
    require_polynomial(model, "logits_from_network")
    qtn = quimb_tensor()
    v = model.config.vocab_size
    onehot = torch.nn.functional.one_hot(tokens, v).to(dtype)
    x = _contract(qtn.TensorNetwork([qtn.Tensor(onehot, inds=("b", "i", "t")),
                                     qtn.Tensor(model.W_E.to(dtype), inds=("t", "d"))]), ("b", "i", "d"))
    for layer, block in enumerate(model.blocks):
        x = x + _contract(attention_network(model, layer, x), ("b", "i", "o"))
        if block.mlp is not None:
            x = x + _contract(bilinear_network(model, layer, x), ("b", "i", "o"))
    return _contract(qtn.TensorNetwork([qtn.Tensor(x, inds=("b", "i", "d")),
                                        qtn.Tensor(model.W_U.to(dtype), inds=("d", "u"))]), ("b", "i", "u"))
