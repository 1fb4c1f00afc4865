"""Scoring weight-based circuit detections against a synthetic language's planted rules.

Detections use only the weights (no forward pass on data): bigrams from the next-token logits of a
one-token context, skip-trigrams from the full 1-layer circuit averaged over key offsets, previous-token
and induction heads from :mod:`bilinear_toys.circuits`. For each current token the strongest candidate
is *detected* when its score is a robust outlier (``z`` MADs above the median) among the current tokens'
strongest scores (precision and recall are then independent); ``recall_at_k`` is the share of planted
rules among the top ``k = #planted`` candidates overall.
"""

from __future__ import annotations

from typing import Any

import torch

from bilinear_toys import circuits as C
from bilinear_toys.models import ToyTransformer


def extended_direct_path(model: ToyTransformer) -> torch.Tensor:
    """[V, V]: next-token logits given only the current token (a one-token context), a function of the
    weights alone. Besides ``W_E W_U`` (symmetric when tied, so it cannot hold an asymmetric bigram) it
    includes each head attending to the current token itself with weight ``s(x, x)^2`` at offset 0 and
    the MLPs: in a polynomial transformer this self-attention path is where bigrams live."""
    with torch.no_grad():
        ids = torch.arange(model.config.vocab_size, device=model.W_E.device)
        return torch.cat([model(chunk[:, None])[:, 0] for chunk in ids.split(1024)])


def _pr(detected: set, planted: set) -> dict[str, float]:
    tp = len(detected & planted)
    return {"precision": tp / len(detected) if detected else 0.0,
            "recall": tp / len(planted) if planted else 0.0, "n_detected": len(detected),
            "n_planted": len(planted)}


def bigram_recovery(model: ToyTransformer, bigrams: list, z: float = 6.0) -> dict[str, Any]:
    d = extended_direct_path(model).float()
    s = d - d.mean(dim=1, keepdim=True)
    best, nxt = s.max(dim=1)  # the strongest next token for each current token
    detected = {(int(a), int(nxt[a])) for a in _robust_outliers(best, z).nonzero().flatten().tolist()}
    planted = {tuple(map(int, x)) for x in bigrams}
    k = len(planted)
    top = {divmod(int(i), s.shape[1]) for i in s.flatten().topk(k).indices} if k else set()
    return {**_pr(detected, planted), "recall_at_k": len(top & planted) / max(k, 1)}


def _robust_outliers(scores: torch.Tensor, z: float) -> torch.Tensor:
    """Bool mask of ``scores`` above ``median + z * 1.4826 * MAD`` (robust to the outliers sought)."""
    med = scores.median()
    mad = (scores - med).abs().median().clamp_min(1e-12) * 1.4826
    return scores > med + z * mad


def skip_trigram_recovery(model: ToyTransformer, skip_trigrams: list, max_offset: int = 16, z: float = 6.0,
                          layer: int = 0, dst_chunk: int = 32, exclude_src: tuple[int, ...] = (0,)
                          ) -> dict[str, Any]:
    """Planted ``(A, B, C)`` vs entries ``T[dst=B, src=A, out=C]`` of the offset-averaged full circuit,
    centered over ``src``. Excluded as not skip-trigrams: ``C == A`` (copying), ``A == B`` (attending to
    earlier copies of the current token: a bigram path) and ``exclude_src`` (the synthetic language's BOS,
    in every context: a constant). For each current token B its strongest (A, C) is detected when that
    score is a robust outlier (``z`` MADs above the median) among all current tokens' strongest scores."""
    offsets = range(1, max_offset + 1)
    v = model.config.vocab_size
    excl = {"exclude_copying": True, "exclude_same_token": True, "exclude_src": exclude_src}
    bests, triples = [], []
    for ids, t in C.full_circuit_slices(model, offsets=offsets, dst_chunk=dst_chunk, layer=layer):
        t = (t - t.mean(dim=1, keepdim=True)).masked_fill(~C.skip_trigram_mask(ids, v, **excl), float("-inf"))
        best, flat = t.flatten(1).max(dim=1)
        bests.append(best.float().cpu())
        triples += [(int(f) // v, int(b), int(f) % v) for b, f in zip(ids.tolist(), flat.tolist())]
    keep = _robust_outliers(torch.cat(bests), z)
    detected = {tr for tr, k in zip(triples, keep.tolist()) if k}
    planted = {tuple(map(int, x)) for x in skip_trigrams}
    top = {(a, b, c) for a, b, c, _ in C.top_skip_trigrams(model, k=len(planted), offsets=offsets,
                                                           dst_chunk=dst_chunk, layer=layer, **excl)}
    return {**_pr(detected, planted), "recall_at_k": len(top & planted) / max(len(planted), 1)}


def head_recovery(model: ToyTransformer, prev_threshold: float = 0.5, induction_threshold: float = 0.2,
                  behaviour_threshold: float = 0.3, max_offset: int = 16) -> dict[str, Any]:
    """Previous-token and induction heads found from the weights vs found from behaviour (row-normalized
    patterns on repeated random tokens)."""
    n_l, n_h = model.config.n_layers, model.config.n_head
    prev_w = torch.tensor([[C.previous_token_score_weights(model, l, h, max_offset) for h in range(n_h)]
                           for l in range(n_l)])
    ind_w = C.induction_scores_weights(model, max_offset) if n_l > 1 else torch.zeros(n_l, n_h)
    beh = C.head_scores_behaviour(model, half=min(32, (model.config.n_ctx - 1) // 2))
    out: dict[str, Any] = {"weights": {"previous_token": prev_w.tolist(), "induction": ind_w.tolist()},
                           "behaviour": {k: v.tolist() for k, v in beh.items()}}
    for kind, w, thr in (("previous_token", prev_w, prev_threshold),
                         ("induction", ind_w, induction_threshold)):
        det = {tuple(x) for x in (w > thr).nonzero().tolist()}
        ref = {tuple(x) for x in (beh[kind] > behaviour_threshold).nonzero().tolist()}
        out[kind] = _pr(det, ref)
    return out


def rule_recovery(model: ToyTransformer, rules: dict[str, Any], max_offset: int = 16) -> dict[str, Any]:
    """All of the above for a ``SyntheticRules.to_dict()`` (bigrams, skip_trigrams)."""
    out: dict[str, Any] = {"bigrams": bigram_recovery(model, rules.get("bigrams", []))}
    if rules.get("skip_trigrams"):
        out["skip_trigrams"] = skip_trigram_recovery(model, rules["skip_trigrams"], max_offset)
    out["heads"] = head_recovery(model, max_offset=max_offset)
    return out
