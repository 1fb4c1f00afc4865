"""Scoring weight-based circuit detections against a synthetic language's planted rules.

Detections use only the weights (no forward pass on data): bigrams from the next-token logits of the
one-token context ``(BOS, a)``, skip-trigrams from the whole model's circuit read in contexts of uniform
random tokens (:func:`filler_contexts`: a seed, not data) into which ``A`` is written at key offsets
1..max_offset before the current token ``B``, previous-token and induction heads from
:mod:`bilinear_toys.circuits`. Besides the weights a detector sees the vocabulary size, the BOS id (every
sequence starts with it and holds it nowhere else) and ``max_offset``; never the rules, the token roles
(fillers, brackets) or sequences of the language.

**Criterion.** Per current token the detector keeps its strongest candidate (the next token for bigrams,
the (A, C) pair for skip-trigrams) and gives it a robust z-score against the strongest candidates of all
current tokens: ``z = (score - median) / (1.4826 MAD)``. Most current tokens carry no rule, so they form
the null distribution; a candidate is *detected* when ``z > 6`` (a priori). Heads are detected when
their weight score exceeds a threshold: previous-token heads by the lift of their positional profile at
offset 1 over uniform (``(max_offset + 1) *`` the share at offset 1; threshold 3, like the behaviour
reference), induction heads by :func:`~bilinear_toys.circuits.induction_scores_weights` (threshold
0.3). Thresholds are checked or chosen on a model trained on a
different language (another seed: other rule tokens) by :func:`calibrate_thresholds` and then applied
unchanged to the evaluated model; without calibration the defaults of :data:`DEFAULT_THRESHOLDS` hold.
``recall_at_k`` ranks every candidate and takes the top ``k = #planted`` (threshold-free).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bilinear_toys import circuits as C
from bilinear_toys.models import ToyTransformer

# heads: previous-token lift over uniform (as the behaviour reference's 3x), induction match x copying
# (chosen on calibration-language models, 2026-12-03; see docs/bilinear-toys.md)
DEFAULT_THRESHOLDS = {"bigrams": 6.0, "skip_trigrams": 6.0, "previous_token": 3.0, "induction": 0.3}


def extended_direct_path(model: ToyTransformer, prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """[V, V]: next-token logits given only the current token (after the fixed ``prefix``, e.g. the BOS
    that starts every synthetic sequence), i.e. the model's polynomial evaluated on one-hot inputs, no
    data. Besides ``W_E W_U`` (symmetric when tied, so it cannot hold an asymmetric bigram) it includes
    each head attending to the current token itself with weight ``s(x, x)^2`` at offset 0 and the MLPs:
    in a polynomial transformer this self-attention path is where bigrams live."""
    with torch.no_grad():
        ids = torch.arange(model.config.vocab_size, device=model.W_E.device)
        pre = torch.tensor(prefix, dtype=torch.long, device=ids.device)
        return torch.cat([model(torch.cat([pre.expand(len(c), -1), c[:, None]], 1))[:, -1]
                          for c in ids.split(1024)])


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """``(scores - median) / (1.4826 MAD)``: z-scores that the outliers being sought do not inflate. The
    MAD's floor (all-equal scores: no blow-up) is relative to the median magnitude, not the maximum, so
    that one extreme score cannot compress the others' z."""
    med = scores.median()
    finite = scores[scores.isfinite()].abs()
    floor = 1e-6 * float(finite.median().clamp_min(1e-12)) if finite.numel() else 1e-12
    mad = (scores - med).abs().median().clamp_min(floor) * 1.4826
    return (scores - med) / mad


def _score(candidates: list[tuple], z: torch.Tensor, planted: set, threshold: float,
           top: set) -> dict[str, Any]:
    """Precision/recall of the candidates with ``z > threshold``, plus the z-scores calibration needs."""
    detected = {c for c, zi in zip(candidates, z.tolist()) if zi > threshold and zi == zi}
    tp = len(detected & planted)
    hit = [c in planted for c in candidates]
    other = [float(zi) for zi, h in zip(z, hit) if not h]
    return {"precision": tp / len(detected) if detected else 0.0,
            "recall": tp / len(planted) if planted else 0.0, "n_detected": len(detected),
            "n_planted": len(planted), "threshold": threshold, "detected": sorted(detected),
            "recall_at_k": len(top & planted) / max(len(planted), 1),
            "candidates": [list(c) for c in candidates], "z": [round(float(zi), 4) for zi in z],
            "planted": sorted(planted),
            "missed": sorted(planted - detected), "false_positives": sorted(detected - planted),
            "z_planted": sorted(round(float(zi), 3) for zi, h in zip(z, hit) if h),
            "z_max_other": round(max(other, default=float("-inf")), 3),
            "z_other_top": [round(x, 3) for x in sorted(other, reverse=True)[:32]]}


def bigram_recovery(model: ToyTransformer, bigrams: list, threshold: float | None = None,
                    prefix: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Planted ``(a, b)`` vs the strongest next token of each current token ``a`` in the row-centered
    :func:`extended_direct_path` after ``prefix`` (the synthetic language's BOS): the context
    ``(BOS, a)`` is the data's own at position 1, where nothing but ``a`` can trigger a rule. The
    ``prefix`` tokens are no current tokens (``(BOS, BOS)`` is outside the data, and a polynomial model
    may extrapolate it to logits that would dominate the scores)."""
    d = extended_direct_path(model, prefix).float().cpu()
    rows = torch.tensor([a for a in range(d.shape[0]) if a not in prefix], dtype=torch.long)
    s = d[rows] - d[rows].mean(dim=1, keepdim=True)
    best, nxt = s.max(dim=1)
    candidates = [(int(a), int(b)) for a, b in zip(rows, nxt)]
    planted = {tuple(map(int, x)) for x in bigrams}
    top = {(int(rows[int(i) // s.shape[1]]), int(i) % s.shape[1])
           for i in s.flatten().topk(len(planted)).indices} if planted else set()
    thr = DEFAULT_THRESHOLDS["bigrams"] if threshold is None else threshold
    return _score(candidates, robust_z(best), planted, thr, top)


@torch.no_grad()
def context_circuit_slices(model: ToyTransformer, offsets: range | list[int] = range(1, 17),
                           prefix: tuple[int, ...] = (0,), dst_chunk: int = 8
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(dst_ids [n], T[n, V(src), V(out)])``: the whole model's skip-trigram circuit, every layer
    and every composition path included, averaged over key offsets ``delta``:

    ``T[B, A, C] = mean_delta logits(prefix, A, 0^(delta-1), B)[C] - logits(prefix, 0^delta, B)[C]``

    where ``0`` is an *inert* position (zero embedding: its query, key and value vanish, so in a
    polynomial model it neither attends nor is attended, and its residual stays zero in every layer). It
    is the model's tensor network contracted on one-hot minimal contexts (:func:`logits_from_network`
    proves the two equal), a function of the weights: no data. For one layer, one offset and no prefix it
    equals ``full_circuit_slices(include_mlp=True)``.
    """
    C._common.require_polynomial(model, "context_circuit_slices")
    v, device = model.config.vocab_size, model.W_E.device
    pre = torch.tensor(prefix, dtype=torch.long, device=device)
    src = torch.arange(v, device=device)
    for start in range(0, v, dst_chunk):
        ids = torch.arange(start, min(start + dst_chunk, v), device=device)
        total = torch.zeros(len(ids), v, v, device=device)
        for delta in offsets:
            n = len(ids) * v
            tokens = torch.zeros(n, len(pre) + delta + 1, dtype=torch.long, device=device)
            tokens[:, :len(pre)] = pre
            tokens[:, len(pre)] = src.repeat(len(ids))
            tokens[:, -1] = ids.repeat_interleave(v)
            live = torch.zeros_like(tokens, dtype=torch.bool)
            live[:, :len(pre) + 1] = True
            live[:, -1] = True
            base = live.clone()
            base[:, len(pre)] = False
            outs = []
            for mask in (live, base):
                with model.hooks([("hook_embed", lambda x, hook, m=mask: x * m[..., None].to(x.dtype))]):
                    outs.append(model(tokens)[:, -1].float())
            total += (outs[0] - outs[1]).view(len(ids), v, v)
        yield ids, total / len(offsets)


def filler_contexts(vocab_size: int, n: int, length: int, seed: int = 0, exclude: tuple[int, ...] = (0,)
                    ) -> torch.Tensor:
    """[n, length] uniform random tokens, none of them in ``exclude`` (the BOS, which a sequence holds
    only at its start): contexts of real tokens in which :func:`filler_circuit_slices` reads the
    circuit. A function of ``seed`` alone: no data, no rule, not even the model."""
    allowed = torch.tensor([t for t in range(vocab_size) if t not in exclude], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n, length), generator=g)]


@torch.no_grad()
def filler_circuit_slices(model: ToyTransformer, contexts: torch.Tensor, offsets: range | list[int],
                          prefix: tuple[int, ...] = (0,), dst_chunk: int = 8, batch: int = 4096
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(dst_ids [n], T[n, V(src), V(out)])``: the whole model's skip-trigram circuit read in the
    token ``contexts`` [m, K] (e.g. :func:`filler_contexts`), context ``i`` at key offset
    ``delta_i = offsets[i % len(offsets)]`` (``<= K``):

    ``T[B, A, C] = mean_i logits(prefix, c_i with c_i[K - delta_i] := A, B)[C]``

    i.e. ``A`` written ``delta_i`` positions before the current token ``B`` into a context of real
    tokens; centered over ``A`` it is the effect of having ``A`` there instead of another token."""
    C._common.require_polynomial(model, "filler_circuit_slices")
    v, device = model.config.vocab_size, model.W_E.device
    m, k = contexts.shape
    deltas = torch.tensor([offsets[i % len(offsets)] for i in range(m)], device=device)
    if int(deltas.max()) > k:
        raise ValueError(f"contexts: expected >= {int(deltas.max())} tokens (the largest offset), got {k}")
    pre = torch.tensor(prefix, dtype=torch.long, device=device)
    base = torch.cat([pre.expand(m, -1), contexts.to(device)], 1)  # [m, P + K]
    src = torch.arange(v, device=device)
    rows = torch.arange(m, device=device)
    for start in range(0, v, dst_chunk):
        ids = torch.arange(start, min(start + dst_chunk, v), device=device)
        tokens = base[:, None].repeat(1, v, 1)  # [m, A, P + K]
        tokens[rows, :, len(pre) + k - deltas] = src
        tokens = torch.cat([tokens[None].expand(len(ids), -1, -1, -1),
                            ids[:, None, None, None].expand(-1, m, v, 1)], -1).flatten(0, 2)
        out = torch.cat([model(t)[:, -1].float() for t in tokens.split(batch)])
        yield ids, out.view(len(ids), m, v, v).mean(1)


def skip_trigram_recovery(model: ToyTransformer, skip_trigrams: list, max_offset: int = 16,
                          threshold: float | None = None, dst_chunk: int = 32,
                          exclude_src: tuple[int, ...] = (0,), include_mlp: bool = True,
                          exclude_dst: set[int] | frozenset = frozenset(),
                          circuit: str = "filler", contexts: torch.Tensor | None = None
                          ) -> dict[str, Any]:
    """Planted ``(A, B, C)`` vs entries ``T[dst=B, src=A, out=C]`` of an offset-averaged circuit, centered
    over ``src`` (effects of ``B`` alone) and then over ``dst`` (effects of ``A`` alone, e.g. the bigram of
    ``A`` leaking through a previous-token head): what remains is the interaction of ``A`` and ``B``. The
    V^3 circuit is held on the CPU (8 MiB at V = 128).

    ``circuit="filler"``: :func:`filler_circuit_slices`, the whole model (composition included) read in
    ``contexts`` [m, K >= max_offset] of real tokens, by default ``max_offset`` contexts of ``max_offset``
    uniform tokens (:func:`filler_contexts`, seed 0), one per key offset 1..max_offset.
    ``circuit="minimal"``: :func:`context_circuit_slices`, the whole model on minimal contexts (BOS, A,
    inert positions, B); a high-degree polynomial (``transformer_2L``) extrapolates those far outside
    anything it was trained on. ``circuit="paths"``: the full circuit of each layer's heads reading the
    token embeddings (direct paths, no composition), with each block's MLP path (``include_mlp``), summed
    over layers.

    Excluded as not skip-trigrams: ``C == A`` (copying), ``A == B`` (attending to earlier copies of the
    current token: a bigram path), ``exclude_src`` (the synthetic language's BOS: in every context, so a
    constant, which the MLP path takes as part of every context; never a current token with a context,
    never predicted, never a source: it stays out of the centering over ``src`` too) and
    ``exclude_dst``: current tokens whose next token is already certain (sources of bigrams detected in
    the weights): training never constrains their other logits, which hold A-B interactions that mean
    nothing."""
    offsets = range(1, max_offset + 1)
    v = model.config.vocab_size
    planted = {tuple(map(int, x)) for x in skip_trigrams}
    k = max(len(planted), 1)
    if circuit == "filler":
        if contexts is None:
            contexts = filler_contexts(v, max_offset, max_offset, exclude=exclude_src)
        layers = [filler_circuit_slices(model, contexts, offsets, prefix=tuple(exclude_src),
                                        dst_chunk=dst_chunk)]
    elif circuit == "minimal":
        layers = [context_circuit_slices(model, offsets, prefix=tuple(exclude_src), dst_chunk=dst_chunk)]
    elif circuit == "paths":
        layers = [C.full_circuit_slices(model, offsets=offsets, dst_chunk=dst_chunk, layer=layer,
                                        include_mlp=include_mlp, context=exclude_src)
                  for layer in range(model.config.n_layers)]
    else:
        raise ValueError(f"circuit={circuit!r}: expected 'filler', 'minimal' or 'paths'")
    parts = [(slices[0][0].cpu(), sum(t for _, t in slices).float().cpu()) for slices in zip(*layers)]
    # [dst, src, out]: center over the sources a context can hold (BOS written mid-context is outside the
    # data, and a polynomial model may extrapolate it to logits that would swamp every mean)
    src_ok = ~torch.isin(torch.arange(v), torch.tensor(exclude_src, dtype=torch.long))
    parts = [(ids, t - t[:, src_ok].mean(dim=1, keepdim=True)) for ids, t in parts]
    live = [ids for ids, _ in parts if ids.numel()]
    skip = torch.tensor(sorted({*exclude_src, *exclude_dst}), dtype=torch.long)
    dst_mean = sum(t[~torch.isin(ids, skip)].sum(0) for ids, t in parts)
    dst_mean = dst_mean / max(sum(int((~torch.isin(ids, skip)).sum()) for ids in live), 1)
    bests, candidates, top_vals, top_keys = [], [], torch.empty(0), []
    for ids, t in parts:
        keep = C.skip_trigram_mask(ids, v, exclude_copying=True, exclude_same_token=True,
                                   exclude_src=exclude_src)
        for tok in exclude_src:
            keep[ids == tok] = False
            keep[:, :, tok] = False
        for b in exclude_dst:
            keep[ids == b] = False
        t = (t - dst_mean).masked_fill(~keep, float("-inf"))  # and over dst: effects of A alone
        best, flat = t.flatten(1).max(dim=1)
        bests.append(best)
        candidates += [(int(f) // v, int(b), int(f) % v) for b, f in zip(ids.tolist(), flat.tolist())]
        vals, idx = t.flatten().topk(min(k, t.numel()))
        top_vals = torch.cat([top_vals, vals])
        top_keys += [(int(i) % (v * v) // v, int(ids[int(i) // (v * v)]), int(i) % v) for i in idx]
    top = {top_keys[i] for i in top_vals.topk(min(k, len(top_keys))).indices.tolist()}
    thr = DEFAULT_THRESHOLDS["skip_trigrams"] if threshold is None else threshold
    out = _score(candidates, robust_z(torch.cat(bests)), planted, thr, top if planted else set())
    if circuit == "filler":
        out["contexts"] = contexts.tolist()  # all that the detector saw besides the weights
    return out


def head_recovery(model: ToyTransformer, thresholds: dict[str, float] | None = None,
                  behaviour_threshold: float = 3.0, max_offset: int = 16) -> dict[str, Any]:
    """Previous-token and induction heads found from the weights vs found from behaviour, the reference
    (the generator plants the need for induction, not which head does it): on repeated random tokens,
    the attention to the previous token / to the token after the earlier occurrence relative to uniform
    attention over the row (:func:`~bilinear_toys.circuits.head_scores_behaviour` with ``relative``); a
    head is a reference head when that lift exceeds ``behaviour_threshold`` (3x uniform, fixed a priori)."""
    thr = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    n_l, n_h = model.config.n_layers, model.config.n_head
    prev_w = torch.tensor([[C.previous_token_score_weights(model, l, h, max_offset) for h in range(n_h)]
                           for l in range(n_l)]) * (max_offset + 1)  # lift over uniform
    ind_w = C.induction_scores_weights(model, max_offset) if n_l > 1 else torch.zeros(n_l, n_h)
    beh = C.head_scores_behaviour(model, half=min(32, (model.config.n_ctx - 1) // 2), relative=True)
    out: dict[str, Any] = {"weights": {"previous_token": prev_w.tolist(), "induction": ind_w.tolist()},
                           "behaviour": {k: v.tolist() for k, v in beh.items()}}
    out["behaviour_threshold"] = behaviour_threshold
    for kind, w in (("previous_token", prev_w), ("induction", ind_w)):
        out[kind] = _score_heads(w, beh[kind] > behaviour_threshold, thr[kind])
    return out


def _score_heads(w: torch.Tensor, is_ref: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Heads with weight score ``w [L, H] > threshold`` vs the reference heads ``is_ref [L, H]``."""
    det = {tuple(x) for x in (w > threshold).nonzero().tolist()}
    ref = {tuple(x) for x in is_ref.nonzero().tolist()}
    other = sorted(w[~is_ref].tolist(), reverse=True)
    tp = len(det & ref)
    return {"precision": tp / len(det) if det else 0.0, "recall": tp / len(ref) if ref else 0.0,
            "n_detected": len(det), "n_reference": len(ref), "threshold": threshold,
            "detected": sorted(det), "reference": sorted(ref),
            "z_planted": sorted(w[is_ref].tolist()),
            "z_max_other": other[0] if other else float("-inf"), "z_other_top": other}


def apply_thresholds(recovery: dict[str, Any], thresholds: dict[str, float]) -> dict[str, Any]:
    """A :func:`rule_recovery` result re-scored with other ``thresholds`` (e.g. from
    :func:`calibrate_thresholds` on a calibration model), from the scores it stored: no recomputation.
    The skip-trigram scan keeps the bigram sources it left out in the stored run (detected at that run's
    bigram threshold)."""
    out = dict(recovery)
    for key, name in (("bigrams", "bigrams"), ("skip_trigrams", "skip_trigrams"),
                      ("skip_trigrams_direct_paths", "skip_trigrams")):
        if key in recovery and name in thresholds:
            e, thr = recovery[key], thresholds[name]
            planted = {tuple(x) for x in e["planted"]}
            det = {tuple(c) for c, z in zip(e["candidates"], e["z"]) if z > thr}
            tp = len(det & planted)
            out[key] = {**e, "threshold": thr, "detected": sorted(det), "n_detected": len(det),
                        "precision": tp / len(det) if det else 0.0,
                        "recall": tp / len(planted) if planted else 0.0,
                        "missed": sorted(planted - det), "false_positives": sorted(det - planted)}
    heads = recovery.get("heads")
    if heads:
        out["heads"] = dict(heads)
        for kind in ("previous_token", "induction"):
            if kind in thresholds:
                ref = torch.tensor(heads["behaviour"][kind]) > heads["behaviour_threshold"]
                out["heads"][kind] = _score_heads(torch.tensor(heads["weights"][kind]), ref, thresholds[kind])
    out["thresholds"] = dict(thresholds)
    return out


def rule_recovery(model: ToyTransformer, rules: dict[str, Any], max_offset: int = 16,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """All of the above for a ``SyntheticRules.to_dict()`` (bigrams, skip_trigrams), with ``thresholds``
    (keys of :data:`DEFAULT_THRESHOLDS`, e.g. from :func:`calibrate_thresholds`)."""
    thr = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out: dict[str, Any] = {"bigrams": bigram_recovery(model, rules.get("bigrams", []), thr["bigrams"])}
    if rules.get("skip_trigrams"):
        sources = {int(b) for b, _ in out["bigrams"]["detected"]}
        for key, circuit in (("skip_trigrams", "filler"), ("skip_trigrams_direct_paths", "paths")):
            out[key] = skip_trigram_recovery(model, rules["skip_trigrams"], max_offset,
                                             thr["skip_trigrams"], exclude_dst=sources, circuit=circuit)
    out["heads"] = head_recovery(model, thr, max_offset=max_offset)
    return out


def calibrate_thresholds(recovery: dict[str, Any]) -> dict[str, float]:
    """Thresholds from a :func:`rule_recovery` of a *calibration* model (another language seed); apply
    them to a different model.

    Every default threshold (:data:`DEFAULT_THRESHOLDS`) stands whenever it separates the calibration
    model's planted candidates or reference heads (``z_planted``) from the others: a calibration model
    only *checks* it. Where the default does not separate but some cut does, the midpoint between the
    weakest planted and the strongest other; where none does, the cut (midpoint between adjacent scores)
    with the best F1; the default when there is nothing planted.
    """
    out = dict(DEFAULT_THRESHOLDS)
    heads = recovery.get("heads", {})
    entries = {"bigrams": recovery.get("bigrams"), "skip_trigrams": recovery.get("skip_trigrams"),
               "previous_token": heads.get("previous_token"), "induction": heads.get("induction")}
    for name, e in entries.items():
        if not e or not e["z_planted"]:
            continue
        pos = e["z_planted"]
        neg = e.get("z_other_top", [e["z_max_other"]] if e["z_max_other"] > float("-inf") else [])
        separated = not neg or min(pos) > max(neg)
        if separated and min(pos) > out[name] >= max(neg, default=float("-inf")):
            continue
        if separated:
            out[name] = (min(pos) + max(neg)) / 2 if neg else min(pos) / 2
            continue
        values = sorted(set(pos) | set(neg))
        cuts = [(a + b) / 2 for a, b in zip(values, values[1:])]
        out[name] = max(cuts, key=lambda cut, pos=pos, neg=neg: _f1(cut, pos, neg))
    return out


def _f1(cut: float, pos: list[float], neg: list[float]) -> float:
    tp, fp = sum(p > cut for p in pos), sum(n > cut for n in neg)
    return 2 * tp / (tp + fp + len(pos)) if tp else 0.0


@torch.no_grad()
def rule_losses(model: torch.nn.Module, tokens: torch.Tensor, rule: torch.Tensor, nll: torch.Tensor,
                batch_size: int = 256, skip_trigrams: list | None = None,
                achievable: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Model loss vs the generator's loss floor, per mechanism (``RULE_NAMES``) and in total.

    tokens, rule, nll [N, T] from ``SyntheticLanguage.generate(n, return_nll=True)``; position ``t``
    (``t >= 1``) is predicted from ``tokens[:, :t]``. Returns ``{name: {"loss", "floor", "count"}}`` with
    ``"all"`` for every position: rule positions have floor 0, so their loss says whether the rule is learnt.
    ``achievable`` [N, T] (:func:`bilinear_toys.data.bayes.bayes_nll`) adds ``"achievable"``: the Bayes
    loss given the tokens, the floor a model can actually reach.
    ``skip_trigrams`` (the planted ``(A, B, C)``) adds one entry ``"skip_trigram A,B,C"`` per rule.
    """
    from bilinear_toys.data.synthetic import RULE_NAMES

    device = next(model.parameters()).device
    losses = []
    for chunk in tokens.split(batch_size):
        logits = model(chunk[:, :-1].to(device)).float()
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:].to(device),
                                                        reduction="none").double().cpu())
    loss, lab, floor = torch.cat(losses), rule[:, 1:], nll[:, 1:]
    masks = [("all", torch.ones_like(lab, dtype=torch.bool)),
             *((name, lab == i) for i, name in enumerate(RULE_NAMES))]
    masks += [(f"skip_trigram {a},{b},{c}", (lab == RULE_NAMES.index("skip_trigram")) & (tokens[:, :-1] == b))
              for a, b, c in (skip_trigrams or [])]
    out = {}
    for name, m in masks:
        if m.any():
            out[name] = {"loss": float(loss[m].mean()), "floor": float(floor[m].mean()),
                         "count": int(m.sum())}
            if achievable is not None:
                out[name]["achievable"] = float(achievable[:, 1:][m].mean())
    return out


def fit_summary(losses: dict[str, dict[str, float]], margin: float = 0.1) -> dict[str, Any]:
    """Per mechanism (and ``"all"``) the gap to the generator's floor and to the achievable (Bayes)
    loss; ``fitted``: every mechanism within ``margin`` nats of its achievable loss."""
    names = [k for k in losses if " " not in k]
    gap_floor = {k: round(losses[k]["loss"] - losses[k]["floor"], 4) for k in names}
    out: dict[str, Any] = {"gap_to_floor": gap_floor, "margin": margin}
    if all("achievable" in losses[k] for k in names):
        gap = {k: round(losses[k]["loss"] - losses[k]["achievable"], 4) for k in names}
        out["gap_to_achievable"] = gap
        out["not_fitted"] = sorted(k for k, g in gap.items() if not g < margin)
        out["fitted"] = not out["not_fitted"]
    return out
