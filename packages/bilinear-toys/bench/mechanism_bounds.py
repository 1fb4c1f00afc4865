"""What simple circuits pay on the synthetic language's induction and bracket tokens, no model involved:
the size of the gaps a trained model leaves to the achievable (Bayes) loss when it learns such a circuit.

**Induction** (the 2nd..nth token of a replayed span). The *k-match copier* looks for the earlier
positions whose last ``k'`` tokens equal the current last ``k'`` tokens, with ``k'`` the longest match up to
``k`` that any earlier position has, and spreads its copy prediction uniformly over the tokens that
followed them. Its **ambiguity cost** ``-log(share of those candidates followed by the true token)`` is zero
for a copier that knows the replayed source; the classic two-layer induction circuit (previous-token
head, then a match on the current token) is the k = 1 copier. Also: the achievable induction loss by
position in the span, and the **span-end cost** of a copier that cannot count how far the span has run
(span lengths uniform over ``span_len``; the Bayes filter counts).

**Brackets** (a closer of the innermost open bracket). The *counting closer* keeps, per bracket type,
openers minus closers seen (what attention can sum); with one type open it names its closer, with both
open it gives the closer of the most recent opener the share ``q`` that is right on this data and the
other closer the rest. Reported: how often both types are open, ``q``, the counting closer's cost
``-log(share given to the true closer)``, and how often a stack of the bracket tokens as seen has the true
closer's opener on top (copied openers are not pushed, so even a full stack of tokens is sometimes wrong)::

    python3 packages/bilinear-toys/bench/mechanism_bounds.py --seeds 2 3 [--sequences 2048] > bounds.json
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from bilinear_toys.data.bayes import bayes_nll
from bilinear_toys.data.synthetic import BRACKET, INDUCTION, SyntheticLanguage
from gpu_rule_recovery import validation_set


def ambiguity_cost(seq: list[int], t: int, k: int) -> float:
    """``-log`` share of the longest-match (up to ``k`` tokens) candidates for ``seq[t]`` that predict it."""
    best, cands = 0, []
    for j in range(t - 1):  # j plays the role of t - 1: its next token seq[j + 1] is known
        n = 0
        while n < k and j - n >= 0 and seq[j - n] == seq[t - 1 - n]:
            n += 1
        if n > best:
            best, cands = n, [j]
        elif n == best and n > 0:
            cands.append(j)
    if not cands:
        return math.inf
    hits = sum(seq[j + 1] == seq[t] for j in cands)
    return math.inf if hits == 0 else -math.log(hits / len(cands))


def span_end_cost(span_len: tuple[int, int]) -> dict[str, float]:
    """Per induction token: the continuation loss of a copier that knows how many tokens of the span it
    has replayed (``counting``) and of the best one that does not (``blind``: one continuation rate)."""
    lo, hi = span_len
    lengths = range(lo, hi + 1)
    # a span of n tokens has induction tokens at positions 2..n and, if n < hi, one "stop" at n + 1
    tokens = sum(n - 1 for n in lengths) / len(lengths)
    stops = sum(n < hi for n in lengths) / len(lengths)
    counting = 0.0
    for m in range(2, hi + 1):
        alive = sum(n >= m - 1 for n in lengths)
        go = sum(n >= m for n in lengths)
        counting += (go / len(lengths)) * -math.log(go / alive)
    c = tokens / (tokens + stops)
    return {"counting": counting / tokens, "blind": -math.log(c), "blind_rate": c}


def _summary(costs: list[float]) -> dict[str, float]:
    """Mean cost where the copier can name the token at all; how often it hedges; how often it cannot
    (every longest-match candidate predicts another token: a chance match longer than the replay so far)."""
    v = np.asarray(costs)
    finite = v[np.isfinite(v)]
    return {"mean_where_possible": float(finite.mean()),
            "share_hedged": float(np.count_nonzero(finite > 0) / v.size),
            "share_impossible": float(1 - finite.size / v.size)}


def bracket_costs(lang: SyntheticLanguage, tokens: list[list[int]], labels: list[list[int]]
                  ) -> dict[str, float]:
    """The counting closer and the token stack on every bracket-closing token (see the module docstring)."""
    closer = dict(lang.rules.brackets)
    opener_of = {c: o for o, c in closer.items()}
    events = []  # (types open, the most recent opener's closer is right, the token stack's top is right)
    for row, lab in zip(tokens, labels):
        stack: list[int] = []
        open_count = dict.fromkeys(closer, 0)
        last_opener = None
        for t in range(1, len(row)):
            x = row[t]
            if lab[t] == BRACKET:
                events.append((sum(c > 0 for c in open_count.values()), last_opener is not None
                               and closer[last_opener] == x, bool(stack) and closer[stack[-1]] == x))
            if x in closer:
                stack.append(x)
                open_count[x] += 1
                last_opener = x
            elif x in opener_of:
                opener = opener_of[x]
                open_count[opener] = max(open_count[opener] - 1, 0)
                if opener in stack:  # pop up to the innermost copy of its opener
                    del stack[len(stack) - 1 - stack[::-1].index(opener):]
    n_open = np.array([e[0] for e in events])
    recent = np.array([e[1] for e in events])
    both = n_open >= 2
    q = float(recent[both].mean()) if both.any() else 1.0
    cost = np.where(both, np.where(recent, -np.log(q), -np.log(max(1 - q, 1e-12))), 0.0)
    cost[n_open == 0] = np.nan  # nothing open by the count: no closer to name
    return {"closes": len(events), "share_both_types_open": float(both.mean()), "q_most_recent_opener": q,
            "counting_closer_cost": float(np.nanmean(cost)),
            "share_nothing_open": float(np.mean(n_open == 0)),
            "share_token_stack_right": float(np.mean([e[2] for e in events]))}


def bounds(lang: SyntheticLanguage, sequences: int, ks: tuple[int, ...]) -> dict:
    """Every number of the module docstring on ``lang``'s validation set of ``gpu_rule_recovery.py``."""
    tokens, rule, _ = validation_set(lang, sequences)
    achievable = bayes_nll(lang, tokens)
    rows, labels = tokens.tolist(), rule.tolist()
    costs = {k: [] for k in ks}
    by_pos: dict[int, list[float]] = {}
    for row, lab, nll in zip(rows, labels, achievable.tolist()):
        run = 1
        for t in range(1, len(row)):
            if lab[t] != INDUCTION:
                run = 1
                continue
            run += 1  # position in the span: its first token is a random event
            by_pos.setdefault(run, []).append(nll[t])
            for k in ks:
                costs[k].append(ambiguity_cost(row, t, k))
    return {
        "language_seed": lang.seed,
        "induction_tokens": int((rule == INDUCTION).sum()),
        "achievable": float(achievable[rule == INDUCTION].mean()),
        "achievable_by_span_position": {m: {"count": len(v), "mean": float(np.mean(v))}
                                        for m, v in sorted(by_pos.items())},
        "ambiguity_cost": {f"k={k}": _summary(v) for k, v in costs.items()},
        "span_end_cost": span_end_cost(lang.span_len),
        "bracket": {"achievable": float(achievable[rule == BRACKET].mean()),
                    **bracket_costs(lang, rows, labels)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3], help="language seeds")
    p.add_argument("--sequences", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=128)
    p.add_argument("--n_ctx", type=int, default=64)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 8])
    args = p.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        lang = SyntheticLanguage(vocab_size=args.vocab_size, seq_len=args.n_ctx + 1, seed=seed)
        print(json.dumps(bounds(lang, args.sequences, tuple(args.ks))), flush=True)


if __name__ == "__main__":
    main()
