"""A seeded synthetic language with planted rules, and the ground truth of every rule.

Tokens: ``0`` is BOS; then bracket pairs, skip-trigram tokens (A, B; C is a filler), bigram sources and
fillers. Each sequence starts with BOS and grows one token at a time; the first applicable mechanism picks
the next token:

1. **induction** (copying): while a copied span is being replayed, the next token of the span (a span of
   ``span_len`` earlier tokens starts with probability ``p_copy``; its second and later tokens are
   predictable by induction: "the token after the earlier occurrence of the current one");
2. **bigram** ``a -> b``: after a bigram source ``a``, always ``b``;
3. **skip-trigram** ``A ... B -> C``: after ``B``, if its ``A`` occurred earlier in the sequence, ``C``;
4. otherwise a random event: start a copy, open a bracket, close the innermost open bracket with its
   partner (**bracket matching**), emit an ``A``, a ``B``, a bigram source, or a filler.

``rules`` (:class:`SyntheticRules`) lists every planted rule; ``generate`` also returns, per position,
which mechanism produced the token (``RULE_NAMES``), so losses and detections can be scored per rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

BOS = 0
RULE_NAMES = ("none", "bigram", "skip_trigram", "induction", "bracket")
NONE, BIGRAM, SKIP_TRIGRAM, INDUCTION, BRACKET = range(5)


@dataclass
class SyntheticRules:
    """Ground truth: ``bigrams`` (a, b), ``skip_trigrams`` (A, B, C), ``brackets`` (open, close)."""

    bigrams: list[tuple[int, int]] = field(default_factory=list)
    skip_trigrams: list[tuple[int, int, int]] = field(default_factory=list)
    brackets: list[tuple[int, int]] = field(default_factory=list)
    fillers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return {k: [list(x) if isinstance(x, tuple) else x for x in v]
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class SyntheticLanguage:
    """Generator of sequences of ``seq_len`` tokens over ``vocab_size`` with rules drawn from ``seed``."""

    vocab_size: int = 128
    seq_len: int = 64
    n_bigrams: int = 8
    n_skip_trigrams: int = 8
    n_brackets: int = 2
    span_len: tuple[int, int] = (4, 8)
    p_copy: float = 0.2
    p_bracket: float = 0.08
    p_skip_a: float = 0.1
    p_skip_b: float = 0.15
    p_bigram: float = 0.1
    seed: int = 0
    rules: SyntheticRules = field(init=False)

    def __post_init__(self) -> None:
        used = 1 + 2 * self.n_brackets + 2 * self.n_skip_trigrams + self.n_bigrams
        n_fill = self.vocab_size - used
        if n_fill < max(4, self.n_skip_trigrams, self.n_bigrams):
            raise ValueError(f"vocab_size={self.vocab_size}: too small for the rules; expected at least "
                             f"{used + max(4, self.n_skip_trigrams, self.n_bigrams)}")
        if not (2 <= self.span_len[0] <= self.span_len[1] and 2 * self.span_len[1] < self.seq_len):
            raise ValueError(f"span_len={self.span_len}: expected 2 <= min <= max < seq_len / 2")
        probs = (self.p_copy, self.p_bracket, self.p_skip_a, self.p_skip_b, self.p_bigram)
        if min(probs) < 0 or sum(probs) > 1:
            raise ValueError(f"p_copy, p_bracket, p_skip_a, p_skip_b, p_bigram={probs}: expected "
                             "non-negative probabilities summing to <= 1")
        rng = np.random.default_rng(self.seed)
        ids = iter(range(1, self.vocab_size))
        brackets = [(next(ids), next(ids)) for _ in range(self.n_brackets)]
        a_tok = [next(ids) for _ in range(self.n_skip_trigrams)]
        b_tok = [next(ids) for _ in range(self.n_skip_trigrams)]
        src = [next(ids) for _ in range(self.n_bigrams)]
        fillers = list(ids)
        c_tok = rng.choice(fillers, size=self.n_skip_trigrams, replace=False).tolist()
        dst = rng.choice(fillers, size=self.n_bigrams, replace=False).tolist()
        self.rules = SyntheticRules(bigrams=list(zip(src, dst)),
                                    skip_trigrams=list(zip(a_tok, b_tok, c_tok)),
                                    brackets=brackets, fillers=fillers)

    def _random_event_probs(self, seq: list[int], stack: list[int]) -> np.ndarray:
        """[V]: the distribution of the next token when no rule applies (step 4 of the module docstring),
        given the generator's state (the sequence so far and the open-bracket stack)."""
        r = self.rules
        p = np.zeros(self.vocab_size)
        lo, hi = self.span_len
        fill = 1.0 - (self.p_copy + self.p_bracket + self.p_skip_a + self.p_skip_b + self.p_bigram)
        if len(seq) >= 2 * hi:  # a copy starts at a uniform position; its first token is that position's
            for n in range(lo, hi + 1):
                np.add.at(p, seq[1:len(seq) - n + 1], self.p_copy / ((hi - lo + 1) * (len(seq) - n)))
        else:
            fill += self.p_copy
        if r.brackets:  # open a uniform bracket or, with one open, close the innermost: half and half
            share = self.p_bracket / 2 if stack else self.p_bracket
            np.add.at(p, [o for o, _ in r.brackets], share / len(r.brackets))
            if stack:
                p[dict(r.brackets)[stack[-1]]] += self.p_bracket / 2
        else:
            fill += self.p_bracket
        groups = ([a for a, _, _ in r.skip_trigrams], [b for _, b, _ in r.skip_trigrams],
                  [a for a, _ in r.bigrams])
        for mass, toks in zip((self.p_skip_a, self.p_skip_b, self.p_bigram), groups):
            if toks:
                np.add.at(p, toks, mass / len(toks))
            else:
                fill += mass
        np.add.at(p, r.fillers, fill / len(r.fillers))
        return p

    def _sequence(self, rng: np.random.Generator, with_nll: bool = False
                  ) -> tuple[list[int], list[int], list[float]]:
        r = self.rules
        bigram = dict(r.bigrams)
        trig = {b: (a, c) for a, b, c in r.skip_trigrams}
        a_toks = [a for a, _, _ in r.skip_trigrams]
        b_toks = [b for _, b, _ in r.skip_trigrams]
        src_toks = [a for a, _ in r.bigrams]
        closer = dict(r.brackets)
        seq, labels, nll = [BOS], [NONE], [0.0]
        seen: set[int] = {BOS}
        stack: list[int] = []
        copy: list[int] = []
        cum = np.cumsum([self.p_copy, self.p_bracket, self.p_skip_a, self.p_skip_b, self.p_bigram])
        while len(seq) < self.seq_len:
            cur = seq[-1]
            label, probs = NONE, None
            if copy:
                nxt, label = copy.pop(0), INDUCTION
            elif cur in bigram:
                nxt, label = bigram[cur], BIGRAM
            elif cur in trig and trig[cur][0] in seen:
                nxt, label = trig[cur][1], SKIP_TRIGRAM
            else:
                probs = self._random_event_probs(seq, stack) if with_nll else None
                u = rng.random()
                lo, hi = self.span_len
                if u < cum[0] and len(seq) >= 2 * hi:
                    n = int(rng.integers(lo, hi + 1))
                    start = int(rng.integers(1, len(seq) - n + 1))
                    copy = seq[start:start + n]
                    nxt = copy.pop(0)
                elif cum[0] <= u < cum[1] and r.brackets:
                    if stack and rng.random() < 0.5:
                        nxt, label = closer[stack.pop()], BRACKET
                    else:
                        stack.append(r.brackets[int(rng.integers(len(r.brackets)))][0])
                        nxt = stack[-1]
                elif cum[1] <= u < cum[2] and a_toks:
                    nxt = a_toks[int(rng.integers(len(a_toks)))]
                elif cum[2] <= u < cum[3] and b_toks:
                    nxt = b_toks[int(rng.integers(len(b_toks)))]
                elif cum[3] <= u < cum[4] and src_toks:
                    nxt = src_toks[int(rng.integers(len(src_toks)))]
                else:
                    nxt = r.fillers[int(rng.integers(len(r.fillers)))]
            seq.append(int(nxt))
            labels.append(label)
            nll.append(0.0 if probs is None else float(-np.log(probs[int(nxt)])))
            seen.add(int(nxt))
        return seq, labels, nll

    def generate(self, n: int, seed: int | None = None, return_nll: bool = False
                 ) -> tuple[torch.Tensor, ...]:
        """``(tokens [n, seq_len], rule [n, seq_len])``: ``rule[:, t]`` is the mechanism (index into
        ``RULE_NAMES``) that produced ``tokens[:, t]``, i.e. what predicting it from ``tokens[:, :t]``
        tests. ``seed`` defaults to the language's seed + 1 (sequences differ from the rule draw).

        ``return_nll`` adds ``nll [n, seq_len]`` (float64): ``-log p(tokens[:, t])`` under the generator's
        own next-token distribution given its state (the open copy, the bracket stack, the tokens seen).
        Its mean is the **loss floor**: no model reading only the tokens can do better on average (the
        state is a function of the generator's choices, which include everything the tokens reveal); rule
        positions are 0, random events carry the entropy of the mixture of step 4."""
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        out = [self._sequence(rng, return_nll) for _ in range(n)]
        tokens = torch.tensor([s for s, _, _ in out])
        rule = torch.tensor([lab for _, lab, _ in out])
        if return_nll:
            return tokens, rule, torch.tensor([x for _, _, x in out], dtype=torch.float64)
        return tokens, rule

    def generate_many(self, n: int, seed: int = 0, workers: int = 0, chunk: int = 512) -> torch.Tensor:
        """tokens [n, seq_len] in chunks of ``chunk`` sequences, chunk ``i`` drawn by a generator seeded
        with ``(language seed, seed, i)``: the same tokens for any ``workers`` (processes; 0 = this one)."""
        sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
        jobs = [((self.seed, 1000 + seed, i), size) for i, size in enumerate(sizes)]
        if workers > 0 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: forking a process whose torch/OpenMP threads are running can deadlock
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = list(pool.map(self._chunk, jobs))
        else:
            parts = [self._chunk(job) for job in jobs]
        return torch.cat(parts) if parts else torch.empty(0, self.seq_len, dtype=torch.long)

    def sample(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [n, seq_len], rule [n, seq_len])`` from the same distribution as :meth:`generate`,
        drawn for all ``n`` sequences at once with numpy (another random stream: not the same sequences).
        About 1 s per 10^5 sequences of 64 tokens, against ~30 s for the per-sequence generator."""
        r, (lo, hi), t_max = self.rules, self.span_len, self.seq_len
        v = self.vocab_size
        rng = np.random.default_rng((self.seed, 2000 + seed))
        bigram = np.full(v, -1)
        trig_a, trig_c = np.full(v, -1), np.full(v, -1)
        closer = np.zeros(v, dtype=np.int64)
        for a, b in r.bigrams:
            bigram[a] = b
        for a, b, c in r.skip_trigrams:
            trig_a[b], trig_c[b] = a, c
        for o, c in r.brackets:
            closer[o] = c
        groups = [np.array(g, dtype=np.int64) for g in ([o for o, _ in r.brackets],
                  [a for a, _, _ in r.skip_trigrams], [b for _, b, _ in r.skip_trigrams],
                  [a for a, _ in r.bigrams], r.fillers)]
        cum = np.cumsum([self.p_copy, self.p_bracket, self.p_skip_a, self.p_skip_b, self.p_bigram])
        seq = np.zeros((n, t_max), dtype=np.int64)
        lab = np.zeros((n, t_max), dtype=np.int64)
        seen = np.zeros((n, v), dtype=bool)
        seen[:, BOS] = True
        stack = np.zeros((n, t_max), dtype=np.int64)
        depth = np.zeros(n, dtype=np.int64)
        ptr, rem = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        rows = np.arange(n)
        for t in range(1, t_max):
            cur, nxt, label = seq[:, t - 1], np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            copying = rem > 0
            nxt[copying], label[copying] = seq[rows[copying], ptr[copying]], INDUCTION
            ptr[copying] += 1
            rem[copying] -= 1
            big = ~copying & (bigram[cur] >= 0)
            nxt[big], label[big] = bigram[cur[big]], BIGRAM
            has_a = trig_a[cur] >= 0
            tri = ~copying & ~big & has_a & seen[rows, np.where(has_a, trig_a[cur], 0)]
            nxt[tri], label[tri] = trig_c[cur[tri]], SKIP_TRIGRAM
            rnd = ~(copying | big | tri)
            u, u2, u3 = rng.random(n), rng.random(n), rng.random(n)
            start_copy = rnd & (u < cum[0]) & (t >= 2 * hi)
            if start_copy.any():
                idx = rows[start_copy]
                span = rng.integers(lo, hi + 1, size=len(idx))
                first = 1 + (u2[idx] * (t - span)).astype(np.int64)
                nxt[idx], ptr[idx], rem[idx] = seq[idx, first], first + 1, span - 1
            kind = np.searchsorted(cum, u, side="right")  # 0 copy, 1 bracket, 2 A, 3 B, 4 source, 5 filler
            kind[kind == 0] = 5  # a copy that could not start yet: filler
            for g, toks in zip(range(1, 6), groups):
                sel = rnd & ~start_copy & (kind == g)
                if not len(toks):  # an empty group's mass goes to the fillers (processed last)
                    kind[kind == g] = 5
                    continue
                if g == 1:
                    close = sel & (depth > 0) & (u2 < 0.5)
                    if close.any():
                        nxt[close] = closer[stack[rows[close], depth[close] - 1]]
                        label[close] = BRACKET
                        depth[close] -= 1
                    sel = sel & ~close
                    nxt[sel] = toks[(u3[sel] * len(toks)).astype(np.int64)]
                    stack[rows[sel], depth[sel]] = nxt[sel]
                    depth[sel] += 1
                else:
                    nxt[sel] = toks[(u3[sel] * len(toks)).astype(np.int64)]
            seq[:, t], lab[:, t] = nxt, label
            seen[rows, nxt] = True
        return torch.from_numpy(seq), torch.from_numpy(lab)

    def _chunk(self, job: tuple[tuple[int, ...], int]) -> torch.Tensor:
        rng = np.random.default_rng(job[0])
        return torch.tensor([self._sequence(rng)[0] for _ in range(job[1])])

    def batches(self, batch_size: int, seed: int = 0, pool_size: int | None = None, workers: int = 0
                ) -> Callable[[int], dict[str, torch.Tensor]]:
        """A ``get_batch(index)`` for ``seqmem_shared.train.Trainer`` (deterministic, resumable).

        Default: ``batch_size`` fresh sequences per index, from a generator seeded with ``(language seed,
        seed, index)`` (an endless stream; generation runs in Python, ~0.3 ms per sequence of 64).
        ``pool_size``: draw that many sequences up front with :meth:`generate_many` (``workers``
        processes) and serve them in order, cycling; make it ``steps * batch_size`` to use each sequence
        once (a small pool lets a model memorize the random events)."""
        if pool_size is not None:
            pool = self.generate_many(pool_size, seed=seed, workers=workers)

            def from_pool(index: int) -> dict[str, torch.Tensor]:
                rows = (torch.arange(batch_size) + index * batch_size) % len(pool)
                return {"input_ids": pool[rows], "attention_mask": torch.ones(batch_size, self.seq_len,
                                                                               dtype=torch.long)}

            return from_pool

        def get_batch(index: int) -> dict[str, torch.Tensor]:
            tokens = self._chunk(((self.seed, 1000 + seed, index), batch_size))
            return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}

        return get_batch


def repeated_random_tokens(vocab_size: int, half: int, batch: int, seed: int = 0, bos: int | None = None
                           ) -> torch.Tensor:
    """[batch, 2 * half (+1)]: random tokens repeated once (the classic induction probe), optional BOS."""
    g = torch.Generator().manual_seed(seed)
    lo = 0 if bos is None else 1
    first = torch.randint(lo, vocab_size, (batch, half), generator=g)
    out = torch.cat([first, first], dim=1)
    return out if bos is None else torch.cat([torch.full((batch, 1), bos), out], dim=1)
