"""Attention circuits read off the weights: direct path, OV and QK circuits, the full 1-layer circuit.

Conventions (row vectors, TransformerLens style): ``OV = W_V W_O`` [d, d], a token's logit effect through a
head is ``W_E OV W_U`` [src, out]. Quadratic attention scores ``s = q . k / dh`` enter the pattern as
``s^2``: the QK circuit is *sign-invariant* (a key is attended when ``|s|`` is large; negative eigenvalues
match as well as positive ones). With RoPE the score depends on the key offset ``delta = i - j``:
``s = x_i W_Q R(-delta) W_K^T x_j / dh``. ``offset=None`` gives the **content-only** circuit (rotation
ignored, identical to offset 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from bilinear_toys.circuits._common import check_layer, key_rotation, quimb_tensor, require_polynomial
from bilinear_toys.models.toy_transformer import ToyTransformer

Offsets = int | Iterable[int] | None


def direct_path(model: ToyTransformer) -> torch.Tensor:
    """[V, V]: ``W_E W_U`` (token -> next-token logits with every block skipped: bigram statistics)."""
    return model.W_E @ model.W_U


def ov_circuit(model: ToyTransformer, layer: int, head: int) -> torch.Tensor:
    """[V, V]: ``W_E W_V W_O W_U`` (logit effect on ``out`` of attending to a ``src`` token)."""
    check_layer(model, layer)
    return (model.W_E @ model.W_V[layer, head]) @ (model.W_O[layer, head] @ model.W_U)


def ov_eigenvalues(model: ToyTransformer, layer: int, head: int) -> torch.Tensor:
    """Complex [dh] (on the CPU): the nonzero eigenvalues of the full OV circuit (computed on the
    [dh, dh] ``W_O W_U W_E W_V``; LAPACK, since cuSOLVER's geev raised CUSOLVER_STATUS_INTERNAL_ERROR
    in parallel jobs on an H200)."""
    m = model.W_O[layer, head] @ model.W_U @ model.W_E @ model.W_V[layer, head]
    if not torch.isfinite(m).all():
        raise ValueError(f"ov_eigenvalues: layer {layer} head {head}: the OV circuit has non-finite entries "
                         "(did training diverge?)")
    return torch.linalg.eigvals(m.detach().double().cpu())


def copying_score(model: ToyTransformer, layer: int, head: int) -> float:
    """``sum(Re lambda) / sum(|lambda|)`` over the OV eigenvalues: +1 for a pure copying head, -1 for
    pure anti-copying."""
    lam = ov_eigenvalues(model, layer, head)
    return float(lam.real.sum() / lam.abs().sum().clamp_min(1e-30))


def ov_diagonal_score(model: ToyTransformer, layer: int, head: int) -> float:
    """Fraction of source tokens whose largest OV logit is the token itself (copying, behaviour-free)."""
    ov = ov_circuit(model, layer, head).detach()
    return float((ov.argmax(-1) == torch.arange(ov.shape[0], device=ov.device)).float().mean())


def qk_circuit(model: ToyTransformer, layer: int, head: int, offset: int | None = None,
               inputs: torch.Tensor | None = None) -> torch.Tensor:
    """[V, V] scores ``s[dst, src]`` between a query token and a key token ``offset`` positions back.

    ``offset=None`` is the content-only circuit. ``inputs`` [N, d] replaces the token embeddings (e.g. the
    OV output of an earlier head for K-composition). The attention pattern is ``s ** 2``.
    """
    check_layer(model, layer)
    e = model.W_E if inputs is None else inputs
    r = key_rotation(model, offset, e)
    return (e @ model.W_Q[layer, head]) @ r @ (model.W_E @ model.W_K[layer, head]).T / model.config.d_head


def qk_pattern(model: ToyTransformer, layer: int, head: int, offsets: Offsets = None) -> torch.Tensor:
    """[V, V]: the pattern ``s^2`` at one offset, or its mean over several (``offsets`` iterable)."""
    if offsets is None or isinstance(offsets, int):
        return qk_circuit(model, layer, head, offsets).square()
    offsets = list(offsets)
    out = sum(qk_circuit(model, layer, head, o).square() for o in offsets)
    return out / len(offsets)


def positional_profile(model: ToyTransformer, layer: int, head: int, max_offset: int = 16,
                       inputs: torch.Tensor | None = None) -> torch.Tensor:
    """[max_offset + 1]: mean squared score over all (query, key) token pairs at each key offset.

    ``mean_{x,y} (x W_Q R W_K^T y / dh)^2 = tr(Gq R Gk R^T) / (N^2 dh^2)`` with ``Gq = (E W_Q)^T (E W_Q)``:
    computed on [dh, dh] Gram matrices, never on V x V.
    """
    check_layer(model, layer)
    e = (model.W_E if inputs is None else inputs).detach().double()
    a, b = e @ model.W_Q[layer, head].detach().double(), e @ model.W_K[layer, head].detach().double()
    g_q, g_k = a.T @ a, b.T @ b
    r = key_rotation(model, torch.arange(max_offset + 1), g_q)
    if r.ndim == 2:
        r = r.expand(max_offset + 1, *r.shape)
    prof = torch.einsum("ab,obc,cd,oad->o", g_q, r, g_k, r)
    return (prof / (e.shape[0] ** 2 * model.config.d_head**2)).float()


def previous_token_score_weights(model: ToyTransformer, layer: int, head: int, max_offset: int = 16) -> float:
    """Share of the positional profile's mass at offset 1 (1.0: attends only to the previous token)."""
    prof = positional_profile(model, layer, head, max_offset)
    return float(prof[1] / prof.sum().clamp_min(1e-30))


@torch.no_grad()  # the decorator, not a with-block: a suspended generator would leak no_grad
def full_circuit_slices(model: ToyTransformer, heads: Iterable[int] | None = None, offsets: Offsets = None,
                        dst_chunk: int = 64, layer: int = 0, include_mlp: bool = False,
                        context: Iterable[int] = ()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(dst_ids [n], T[n, V, V])``: slices of the full circuit ``T[dst, src, out]``.

    ``T[dst, src, out] = sum_h P_h[dst, src] * OV_h[src, out]``: the logit change of ``out`` when the
    current token is ``dst`` and ``src`` is in the context, with ``P_h = qk_pattern(..., offsets)``. The
    V^3 tensor is contracted one ``dst`` slice at a time as the quimb network
    ``P[h, dst, src] E[src, a] W_V[h, a, e] W_O[h, e, d] W_U[d, out]``.

    ``include_mlp`` adds the block's bilinear MLP (if any), which reads the attention output: with
    ``a[dst, src] = sum_h P_h[dst, src] E[src] OV_h`` (what attending to ``src`` writes) and
    ``r[dst] = E[dst] + sum_h s_h(dst, dst)^2 E[dst] OV_h`` (the current token and its self-attention at
    offset 0), the MLP's logit change is ``(MLP(r + a) - MLP(r)) W_U``: the cross term
    ``2 r^T B_out a`` (how ``dst`` and ``src`` combine) plus ``a^T B_out a``. Exact for one context
    token besides ``dst``; interactions between several context tokens are left out, except with the
    tokens in ``context`` (always present, e.g. BOS), whose attention output (pattern ``P``) joins ``r``.
    """
    require_polynomial(model, "full_circuit_slices")
    check_layer(model, layer)
    qtn = quimb_tensor()
    heads = list(range(model.config.n_head)) if heads is None else list(heads)
    mlp = model.blocks[layer].mlp if include_mlp else None
    patterns = torch.stack([qk_pattern(model, layer, h, offsets) for h in heads])  # [H, V, V]
    w_v, w_o = model.W_V[layer, heads], model.W_O[layer, heads]
    fixed = [qtn.Tensor(model.W_E, inds=("src", "a")), qtn.Tensor(w_v, inds=("h", "a", "e")),
             qtn.Tensor(w_o, inds=("h", "e", "d")), qtn.Tensor(model.W_U, inds=("d", "out"))]
    if mlp is not None:
        e_ov = torch.einsum("va,hae,hed->hvd", model.W_E, w_v, w_o)  # [H, V, d]
        self_p = torch.stack([qk_circuit(model, layer, h, 0).diagonal().square() for h in heads])
        resid = model.W_E + torch.einsum("hv,hvd->vd", self_p, e_ov)  # [V, d]
        for c in context:
            resid = resid + torch.einsum("hv,hd->vd", patterns[:, :, c], e_ov[:, c])
    v = model.config.vocab_size
    for start in range(0, v, dst_chunk):
        ids = torch.arange(start, min(start + dst_chunk, v), device=patterns.device)
        tn = qtn.TensorNetwork([qtn.Tensor(patterns[:, ids], inds=("h", "dst", "src")), *fixed])
        out = tn.contract(output_inds=("dst", "src", "out"), optimize="greedy").data
        if mlp is not None:
            a = torch.einsum("hns,hsd->nsd", patterns[:, ids], e_ov)  # [n, V(src), d]
            r = resid[ids][:, None]
            out = out + (mlp(r + a) - mlp(r)) @ model.W_U
        yield ids, out


def top_skip_trigrams(model: ToyTransformer, k: int = 100, offsets: Offsets = None, center: bool = True,
                      dst_chunk: int = 64, layer: int = 0, exclude_copying: bool = False,
                      exclude_same_token: bool = False, exclude_src: Iterable[int] = (),
                      include_mlp: bool = False) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest entries of the full circuit as skip-trigrams ``(src A, dst B, out C, score)``:
    "A earlier in the context, B now -> C next". ``center`` subtracts, per (dst, out), the mean over
    ``src`` (effects that do not depend on which token is attended). Optional exclusions (see
    :func:`skip_trigram_mask`): ``C == A`` (copying), ``A == B`` (a token attending to earlier copies of
    itself: a bigram path), and given source tokens (e.g. a BOS that every context holds). ``include_mlp``:
    see :func:`full_circuit_slices`."""
    best_vals = torch.empty(0)
    best_idx = torch.empty(0, 3, dtype=torch.long)
    v = model.config.vocab_size
    for ids, t in full_circuit_slices(model, offsets=offsets, dst_chunk=dst_chunk, layer=layer,
                                      include_mlp=include_mlp):
        t = t - t.mean(dim=1, keepdim=True) if center else t
        t = t.masked_fill(~skip_trigram_mask(ids, v, exclude_copying, exclude_same_token, exclude_src),
                          float("-inf"))
        vals, flat = t.flatten().float().cpu().topk(min(k, t.numel()))
        d, rest = flat // (v * v), flat % (v * v)
        idx = torch.stack([rest // v, ids.cpu()[d], rest % v], dim=1)
        best_vals, order = torch.cat([best_vals, vals]).topk(min(k, len(best_vals) + len(vals)))
        best_idx = torch.cat([best_idx, idx])[order]
    return [(int(a), int(b), int(c), float(s)) for (a, b, c), s in zip(best_idx.tolist(), best_vals.tolist())]


def skip_trigram_mask(dst_ids: torch.Tensor, vocab_size: int, exclude_copying: bool = False,
                      exclude_same_token: bool = False, exclude_src: Iterable[int] = ()) -> torch.Tensor:
    """Bool [n, V, V] over a full-circuit slice ``[dst, src, out]``: False where an entry is excluded."""
    dev = dst_ids.device
    ar = torch.arange(vocab_size, device=dev)
    keep = torch.ones(len(dst_ids), vocab_size, vocab_size, dtype=torch.bool, device=dev)
    if exclude_copying:
        keep &= (ar[:, None] != ar[None, :])[None]
    if exclude_same_token:
        keep &= (dst_ids[:, None] != ar[None, :])[:, :, None]
    for s in exclude_src:
        keep[:, s, :] = False
    return keep


def composition_scores(model: ToyTransformer, kind: str) -> torch.Tensor:
    """[L, H, L, H]: ``||left @ right||_F / (||left||_F ||right||_F)`` from head (l1, h1) into (l2, h2),
    l1 < l2 (zero elsewhere). ``left = OV[l1, h1]``; ``right`` is ``QK[l2, h2]`` for ``"q"``, its transpose
    for ``"k"`` and ``OV[l2, h2]`` for ``"v"`` (content-only QK)."""
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind={kind!r}: expected 'q', 'k' or 'v'")
    ov, qk = model.OV.detach(), model.QK.detach()
    right = {"q": qk, "k": qk.transpose(-1, -2), "v": ov}[kind]
    n_l, n_h = ov.shape[:2]
    out = torch.zeros(n_l, n_h, n_l, n_h, dtype=ov.dtype, device=ov.device)
    for l1 in range(n_l):
        for l2 in range(l1 + 1, n_l):
            prod = torch.einsum("hab,gbc->hgac", ov[l1], right[l2])
            norms = ov[l1].norm(dim=(-2, -1))[:, None] * right[l2].norm(dim=(-2, -1))[None, :]
            out[l1, :, l2, :] = prod.norm(dim=(-2, -1)) / norms.clamp_min(1e-30)
    return out


def induction_scores_weights(model: ToyTransformer, max_offset: int = 16) -> torch.Tensor:
    """[L, H]: weight-only induction score of each head in layers >= 1: ``match(h) * max(0, copy(h))``.

    The key of position ``j`` seen by head ``(l, h)`` is ``(e(y_j) + p(y_{j-1})) W_K`` where ``p(y) =
    sum_{l0 < l, h0} w_{l0,h0} e(y) OV_{l0,h0}`` is what the earlier heads write about the previous
    token, each weighted by its mean pattern at offset 1 (``positional_profile[1]``: previous-token heads
    dominate; no single head is singled out, since the key reads their sum). The score is squared, so
    with ``a = q(x)·e(y_j)W_K`` and ``b = q(x)·p(y_{j-1})W_K`` (RoPE offsets 1..max_offset, averaged)
    the pattern is ``(a + b)^2``; its mean over the key's own token ``y_j`` is ``b^2 + 2 ā(x) b + const``.
    ``match`` is the fraction of query tokens ``x`` for which that is largest at ``y_{j-1} = x`` (the
    query matches the token *before* the key; chance 1/V); ``copy`` is :func:`copying_score`. The cross
    term ``2 ā b`` matters: heads with a large direct key term match linearly through it.
    """
    require_polynomial(model, "induction_scores_weights")
    n_l, n_h, dh = model.config.n_layers, model.config.n_head, model.config.d_head
    out = torch.zeros(n_l, n_h)
    with torch.no_grad():
        e = model.W_E
        ar = torch.arange(e.shape[0], device=e.device)
        rot = key_rotation(model, torch.arange(1, max_offset + 1), e)
        rot = rot if rot.ndim == 3 else rot[None]
        for l in range(1, n_l):
            prev = sum(positional_profile(model, l0, h0, 1)[1].to(e) * (e @ model.OV[l0, h0])
                       for l0 in range(l) for h0 in range(n_h))
            for h in range(n_h):
                q = e @ model.W_Q[l, h]
                b = torch.einsum("xa,oab,yb->oxy", q, rot, prev @ model.W_K[l, h]) / dh
                a_mean = torch.einsum("xa,oab,yb->ox", q, rot, e @ model.W_K[l, h])[..., None] / (dh * len(e))
                s = (b.square() + 2 * a_mean * b).mean(0)
                match = float((s.argmax(-1) == ar).float().mean())
                out[l, h] = match * max(0.0, copying_score(model, l, h))
    return out


def _repeated_tokens(vocab: int, half: int, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (batch, half), generator=g)
    return torch.cat([first, first], dim=1).to(device)


@torch.no_grad()
def head_scores_behaviour(model: ToyTransformer, half: int = 16, batch: int = 32, seed: int = 0,
                          tokens: torch.Tensor | None = None, relative: bool = False
                          ) -> dict[str, torch.Tensor]:
    """``{"previous_token": [L, H], "induction": [L, H]}`` from row-normalized patterns on repeated
    random tokens ``[r_1..r_n, r_1..r_n]``: mean attention to position ``i - 1`` and, in the second half,
    to ``i - n + 1`` (the token after the earlier occurrence of the current token). ``relative``: each
    row's value times its number of keys ``i + 1`` (the lift over uniform attention: 1 = uniform)."""
    device = model.W_E.device
    if tokens is None:
        tokens = _repeated_tokens(model.config.vocab_size, half, batch, seed, device)
    half = tokens.shape[1] // 2
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    prev, ind = [], []
    t = tokens.shape[1]
    for layer in range(model.config.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].float()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        if relative:
            p = p * torch.arange(1, t + 1, device=device, dtype=p.dtype)[:, None]
        i = torch.arange(1, t, device=device)
        prev.append(p[:, :, i, i - 1].mean(dim=(0, 2)))
        i2 = torch.arange(half, t, device=device)
        ind.append(p[:, :, i2, i2 - half + 1].mean(dim=(0, 2)))
    return {"previous_token": torch.stack(prev).cpu(), "induction": torch.stack(ind).cpu()}
