"""Scoring weight-based circuit detections against a synthetic language's planted rules.

Detections use only the weights (no forward pass on data): bigrams from the (extended) direct path,
skip-trigrams from the full 1-layer circuit averaged over key offsets, previous-token and induction heads
from :mod:`bilinear_toys.circuits`. A candidate is *detected* when its score is ``z`` standard deviations
above the mean of all candidates of its kind (precision and recall are then independent), and also
ranked: ``recall_at_k`` is the share of planted rules among the top ``k = #planted`` candidates.
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


def bigram_recovery(model: ToyTransformer, bigrams: list, z: float = 4.0) -> dict[str, Any]:
    d = extended_direct_path(model).float()
    s = d - d.mean(dim=1, keepdim=True)
    thr = s.mean() + z * s.std()
    detected = {(int(a), int(b)) for a, b in (s > thr).nonzero().tolist()}
    planted = {tuple(map(int, x)) for x in bigrams}
    k = len(planted)
    top = {divmod(int(i), s.shape[1]) for i in s.flatten().topk(k).indices} if k else set()
    return {**_pr(detected, planted), "recall_at_k": len(top & planted) / max(k, 1)}


def skip_trigram_recovery(model: ToyTransformer, skip_trigrams: list, max_offset: int = 16, z: float = 4.0,
                          layer: int = 0, dst_chunk: int = 32) -> dict[str, Any]:
    """Planted ``(A, B, C)`` vs entries ``T[dst=B, src=A, out=C]`` of the offset-averaged full circuit
    (centered over ``src``, copying entries ``out == src`` excluded: those are induction-like copying, not
    skip-trigrams); two passes over the slices (statistics, then thresholding)."""
    offsets = range(1, max_offset + 1)
    n = total = total_sq = 0.0

    for _, t in C.full_circuit_slices(model, offsets=offsets, dst_chunk=dst_chunk, layer=layer):
        t = (t - t.mean(dim=1, keepdim=True)).double()
        keep = ~torch.eye(t.shape[1], dtype=torch.bool, device=t.device)[None].expand_as(t)
        n += float(keep.sum())
        total += float(t[keep].sum())
        total_sq += float(t[keep].square().sum())
    mean = total / n
    std = max(total_sq / n - mean**2, 0.0) ** 0.5
    detected: set[tuple[int, int, int]] = set()
    for ids, t in C.full_circuit_slices(model, offsets=offsets, dst_chunk=dst_chunk, layer=layer):
        t = t - t.mean(dim=1, keepdim=True)
        for d, a, c in (t > mean + z * std).nonzero().tolist():
            if a != c:
                detected.add((a, int(ids[d]), c))
    planted = {tuple(map(int, x)) for x in skip_trigrams}
    top = {(a, b, c) for a, b, c, _ in C.top_skip_trigrams(model, k=len(planted), offsets=offsets,
                                                           dst_chunk=dst_chunk, layer=layer,
                                                           exclude_copying=True)}
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
