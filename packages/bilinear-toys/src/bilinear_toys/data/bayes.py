"""The achievable loss on the synthetic language: exact Bayes next-token probabilities given the tokens.

:meth:`SyntheticLanguage.generate` (``return_nll``) scores each token under the generator's own state,
which includes things the tokens do not reveal: whether a copied span is being replayed (and which
one, and how long it is), and whether a bracket token was pushed on the stack or merely copied. No model
can reach that floor. :func:`bayes_nll` filters the generator's hidden state exactly (a forward pass over
every state consistent with the prefix) and returns ``-log p(x_t | x_<t)`` under the generator: the
lowest expected loss any next-token predictor can have, the **achievable reference**.

Hidden state: ``(ptr, rem, stack)``, the position of the next copied token and how many remain
(``rem = 0``: no copy), and the open-bracket stack. States with equal keys are merged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bilinear_toys.data.synthetic import SyntheticLanguage

State = tuple[int, int, tuple[int, ...]]


class BayesFilter:
    """Posterior over the generator's hidden state of one sequence; :meth:`step` consumes a token."""

    def __init__(self, lang: SyntheticLanguage) -> None:
        self.lang = lang
        r = lang.rules
        self.bigram = dict(r.bigrams)
        self.trig = {b: (a, c) for a, b, c in r.skip_trigrams}
        self.closer = dict(r.brackets)
        self.openers = {o for o, _ in r.brackets}
        # the random event's mass on non-bracket, non-copy tokens; [0]: no copy possible yet, [1]: possible
        self.static = []
        for copy_possible in (False, True):
            p = lang._random_event_probs([0] * (2 * lang.span_len[1] if copy_possible else 1), [])
            p[[o for o, _ in r.brackets]] = 0.0
            if copy_possible:
                p[0] = 0.0  # BOS: only ever reached by a copy, handled separately
            self.static.append(p)
        self.seq: list[int] = []
        self.states: dict[State, float] = {}

    def start(self, bos: int) -> None:
        self.seq, self.states = [bos], {(-1, 0, ()): 1.0}

    def _copy_starts(self, x: int) -> list[tuple[int, int, float]]:
        """(start, n, probability mass) of every copy whose first token is ``x``."""
        lo, hi = self.lang.span_len
        length = len(self.seq)
        if length < 2 * hi:
            return []
        pos = [i for i in range(1, length) if self.seq[i] == x]
        out = []
        for n in range(lo, hi + 1):
            w = self.lang.p_copy / ((hi - lo + 1) * (length - n))
            out += [(i, n, w) for i in pos if i <= length - n]
        return out

    def transitions(self, x: int) -> dict[State, float]:
        """Unnormalized posterior after observing ``x`` next (mass = p(x | prefix) when normalized)."""
        lang, seq = self.lang, self.seq
        cur, seen = seq[-1], set(seq)
        starts = None
        p_br = lang.p_bracket
        out: dict[State, float] = {}

        def add(key: State, w: float) -> None:
            out[key] = out.get(key, 0.0) + w

        for (ptr, rem, stack), w in self.states.items():
            if rem > 0:
                if seq[ptr] == x:
                    add((ptr + 1, rem - 1, stack) if rem > 1 else (-1, 0, stack), w)
            elif cur in self.bigram:
                if x == self.bigram[cur]:
                    add((ptr, rem, stack), w)
            elif cur in self.trig and self.trig[cur][0] in seen:
                if x == self.trig[cur][1]:
                    add((ptr, rem, stack), w)
            else:
                if starts is None:
                    starts = self._copy_starts(x)
                for i, n, m in starts:
                    add((i + 1, n - 1, stack), w * m)
                if self.openers:
                    if x in self.openers:
                        share = p_br / 2 if stack else p_br
                        add((-1, 0, (*stack, x)), w * share / len(self.openers))
                    if stack and x == self.closer[stack[-1]]:
                        add((-1, 0, stack[:-1]), w * p_br / 2)
                s = self.static[len(seq) >= 2 * lang.span_len[1]][x]
                if s > 0:
                    add((-1, 0, stack), w * s)
        return out

    def step(self, x: int) -> float:
        """Consume ``x``; return ``-log p(x | prefix)`` (inf if the prefix makes ``x`` impossible)."""
        out = self.transitions(x)
        total = math.fsum(out.values())
        self.seq.append(int(x))
        if total <= 0.0:
            self.states = {}
            return math.inf
        self.states = {k: v / total for k, v in out.items()}
        return -math.log(total)

    def predictive(self) -> np.ndarray:
        """[V]: ``p(next token | prefix)`` (sums to 1: the check that the filter is the generator)."""
        return np.array([math.fsum(self.transitions(x).values()) for x in range(self.lang.vocab_size)])


def bayes_nll(lang: SyntheticLanguage, tokens: torch.Tensor) -> torch.Tensor:
    """[N, T] float64: ``-log p(tokens[:, t] | tokens[:, :t])`` under the generator with its hidden
    state marginalized exactly (position 0, the BOS, is 0). Its mean over positions produced by a
    mechanism is that mechanism's achievable loss; it is >= the generator's floor on average."""
    out = torch.zeros(tokens.shape, dtype=torch.float64)
    f = BayesFilter(lang)
    for i, row in enumerate(tokens.tolist()):
        f.start(row[0])
        for t, x in enumerate(row[1:], start=1):
            out[i, t] = f.step(x)
    return out
