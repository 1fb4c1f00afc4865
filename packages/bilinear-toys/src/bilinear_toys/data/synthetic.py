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
    p_copy: float = 0.08
    p_bracket: float = 0.08
    p_skip_a: float = 0.1
    p_skip_b: float = 0.15
    p_bigram: float = 0.15
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

    def _sequence(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        r = self.rules
        bigram = dict(r.bigrams)
        trig = {b: (a, c) for a, b, c in r.skip_trigrams}
        a_toks = [a for a, _, _ in r.skip_trigrams]
        b_toks = [b for _, b, _ in r.skip_trigrams]
        src_toks = [a for a, _ in r.bigrams]
        closer = dict(r.brackets)
        seq, labels = [BOS], [NONE]
        seen: set[int] = {BOS}
        stack: list[int] = []
        copy: list[int] = []
        cum = np.cumsum([self.p_copy, self.p_bracket, self.p_skip_a, self.p_skip_b, self.p_bigram])
        while len(seq) < self.seq_len:
            cur = seq[-1]
            label = NONE
            if copy:
                nxt, label = copy.pop(0), INDUCTION
            elif cur in bigram:
                nxt, label = bigram[cur], BIGRAM
            elif cur in trig and trig[cur][0] in seen:
                nxt, label = trig[cur][1], SKIP_TRIGRAM
            else:
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
            seen.add(int(nxt))
        return seq, labels

    def generate(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [n, seq_len], rule [n, seq_len])``: ``rule[:, t]`` is the mechanism (index into
        ``RULE_NAMES``) that produced ``tokens[:, t]``, i.e. what predicting it from ``tokens[:, :t]``
        tests. ``seed`` defaults to the language's seed + 1 (sequences differ from the rule draw)."""
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        out = [self._sequence(rng) for _ in range(n)]
        return torch.tensor([s for s, _ in out]), torch.tensor([lab for _, lab in out])

    def batches(self, batch_size: int, pool_size: int = 4096, seed: int = 0
                ) -> Callable[[int], dict[str, torch.Tensor]]:
        """A ``get_batch(index)`` for ``seqmem_shared.train.Trainer``: rows of a pool of ``pool_size``
        sequences drawn by a generator seeded with ``(seed, index)`` (deterministic, resumable)."""
        pool, _ = self.generate(pool_size, seed=self.seed + 1000 + seed)

        def get_batch(index: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(hash((seed, index)) % 2**63)
            rows = torch.randint(0, pool_size, (batch_size,), generator=g)
            tokens = pool[rows]
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
