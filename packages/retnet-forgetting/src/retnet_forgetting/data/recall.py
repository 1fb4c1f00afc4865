"""Associative-recall sequences with a controlled lag between a fact and its query.

Each sequence is ``[prefix filler] " The ID of NAME is VALUE." [filler, optional distractor facts]
" The ID of NAME is" VALUE``, assembled token by token so that positions are exact:

- ``fact_position``: the (last) token of VALUE in the fact;
- ``query_position``: the last token of the query (the model predicts VALUE next); the state there is
  what probes read;
- ``lag = query_position - fact_position`` (tokens), as close to the requested lag as the pieces allow.

Splits use disjoint names, so probes are evaluated on names they never saw. The result is a pandas
DataFrame (parquet-ready) with one row per sequence.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILLERS = ("prose", "facts", "random", "corpus")
SPLITS = ("train", "val", "test")

_SYLLABLES = ("ka", "lo", "mi", "ra", "to", "ne", "su", "vi", "da", "be", "ro", "fi", "ga", "zu", "pe",
              "ly", "mo", "sa", "te", "wi", "no", "ha", "ju", "ce")
_WORDS = ("the", "a", "river", "quiet", "old", "market", "walked", "slowly", "near", "bright", "garden",
          "house", "morning", "people", "talked", "about", "weather", "and", "small", "birds", "sang",
          "over", "hills", "while", "children", "played", "in", "streets", "of", "town", "evening")


@dataclass
class RecallConfig:
    """What to generate. ``lags`` are requested distances in tokens (fact value -> query end); ``names``
    and ``values`` replace the generated pseudo-names and the automatic number vocabulary."""

    num_sequences: int = 1000
    lags: list[int] = field(default_factory=lambda: [10, 50, 100, 200, 500, 1000])
    filler: str = "prose"
    intervening_facts: int = 0
    num_names: int = 300
    num_values: int = 10
    max_prefix_tokens: int = 32
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    corpus_path: str | None = None
    names: list[str] | None = None
    values: list[int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.filler not in FILLERS:
            raise ValueError(f"filler={self.filler!r}: expected one of {FILLERS}")
        if self.filler == "corpus" and not self.corpus_path:
            raise ValueError("filler='corpus' needs corpus_path (a local UTF-8 text file)")
        if not self.lags or min(self.lags) < 1:
            raise ValueError(f"lags={self.lags!r}: expected a non-empty list of positive token counts")
        if self.names is not None:
            self.num_names = len(set(self.names))
        if self.values is not None:
            self.num_values = len(set(self.values))
        if self.num_names < 3 * len(SPLITS) or self.num_values < 2:
            raise ValueError(f"num_names={self.num_names}, num_values={self.num_values}: expected >= 9 names "
                             "and >= 2 values")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions={self.split_fractions}: expected three fractions summing to 1")


def _encode_fn(tokenizer: Any):
    """``text -> list[int]`` without special tokens, for seqmem or Hugging Face tokenizers."""
    try:
        tokenizer.encode("x", add_special_tokens=False)
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return lambda text: list(tokenizer.encode(text))


def make_names(n: int, seed: int) -> list[str]:
    """``n`` distinct capitalized pseudo-names of 2-3 syllables."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    ordered = sorted(names)  # a set's order depends on PYTHONHASHSEED: fix it before shuffling
    rng.shuffle(ordered)
    return ordered


def value_vocabulary(encode, num_values: int, candidates: range = range(1000)) -> list[int]:
    """The first ``num_values`` integers whose encodings `` {v}`` share all but the last token and end in
    pairwise distinct tokens (BPE: single-token numbers; bytes: a space and one digit), so one token
    names the value and the shared prefix can end the query."""
    out, last_tokens = [], set()
    prefix = encode(f" {candidates.start}")[:-1]
    for v in candidates:
        ids = encode(f" {v}")
        if ids[:-1] == prefix and ids[-1] not in last_tokens:
            out.append(v)
            last_tokens.add(ids[-1])
        if len(out) == num_values:
            return out
    raise ValueError(f"num_values={num_values}: the tokenizer gives only {len(out)} numbers in "
                     f"{candidates.start}..{candidates.stop - 1} with distinct last tokens")


def _check_values(encode, values: list[int]) -> list[int]:
    values = sorted(set(int(v) for v in values))
    enc = [encode(f" {v}") for v in values]
    if len({tuple(e[:-1]) for e in enc}) != 1 or len({e[-1] for e in enc}) != len(values):
        raise ValueError(f"values={values}: their encodings must share all but a last, distinct token "
                         "(e.g. single-token numbers)")
    return values


class _Filler:
    def __init__(self, cfg: RecallConfig, encode, vocab_size: int, rng: random.Random, distractors: list[str],
                 values: list[int]):
        self.cfg, self.encode, self.vocab_size, self.rng = cfg, encode, vocab_size, rng
        self.distractors, self.values = distractors, values
        self.corpus: list[int] | None = None
        if cfg.filler == "corpus":
            self.corpus = encode(Path(cfg.corpus_path).read_text(encoding="utf-8"))
            if len(self.corpus) < 2:
                raise ValueError(f"corpus_path={cfg.corpus_path}: the corpus is (nearly) empty")

    def fact(self) -> list[int]:
        name, value = self.rng.choice(self.distractors), self.rng.choice(self.values)
        return self.encode(f" The ID of {name} is {value}.")

    def tokens(self, n: int, facts: int = 0) -> list[int]:
        """Exactly ``n`` filler tokens (with ``facts`` distractor facts spread inside when they fit)."""
        facts_tokens = [self.fact() for _ in range(facts)]
        body = max(0, n - sum(len(f) for f in facts_tokens))
        if body == 0:
            facts_tokens = []
            body = n
        out = self._plain(body)
        for f in facts_tokens:
            at = self.rng.randrange(len(out) + 1)
            out[at:at] = f
        return out[:n] if len(out) > n else out

    def _plain(self, n: int) -> list[int]:
        kind = self.cfg.filler
        if kind == "random":  # numpy, seeded from the sequence rng: ~50x faster for long lags
            return np.random.default_rng(self.rng.getrandbits(64)).integers(0, self.vocab_size, n).tolist()
        if kind == "corpus":
            start = self.rng.randrange(max(1, len(self.corpus) - n))
            out = self.corpus[start:start + n]
            while len(out) < n:
                out += self.corpus[: n - len(out)]
            return out
        out: list[int] = []
        while len(out) < n:
            if kind == "facts":
                out += self.fact()
            else:
                words = [self.rng.choice(_WORDS) for _ in range(self.rng.randint(5, 12))]
                out += self.encode(" " + " ".join(words).capitalize() + ".")
        return out[:n]


def generate_recall_dataset(config: RecallConfig, tokenizer: Any):
    """One row per sequence (pandas DataFrame); see the module docstring for the columns' meaning."""
    import pandas as pd

    cfg = config
    encode = _encode_fn(tokenizer)
    vocab_size = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    rng = random.Random(cfg.seed)
    if cfg.names is not None:
        names = sorted(set(cfg.names))
        rng.shuffle(names)
    else:
        names = make_names(cfg.num_names, cfg.seed)
    n_train = int(cfg.split_fractions[0] * len(names))
    n_val = int(cfg.split_fractions[1] * len(names))
    split_names = {"train": names[:n_train], "val": names[n_train:n_train + n_val],
                   "test": names[n_train + n_val:]}
    distractors = make_names(cfg.num_names + 50, cfg.seed + 1)
    distractors = [d for d in distractors if d not in set(names)] or distractors
    values = (value_vocabulary(encode, cfg.num_values) if cfg.values is None
              else _check_values(encode, cfg.values))
    filler = _Filler(cfg, encode, vocab_size, rng, distractors, values)
    counts = [round(f * cfg.num_sequences) for f in cfg.split_fractions]
    counts[0] = cfg.num_sequences - counts[1] - counts[2]
    rows = []
    for split, count in zip(SPLITS, counts):
        for _ in range(count):
            rows.append(_sequence(len(rows), split, cfg, rng, encode, filler, split_names[split], values))
    df = pd.DataFrame(rows)
    df.attrs["config"] = asdict(cfg)
    df.attrs["values"] = values
    return df


def _sequence(seq_id: int, split: str, cfg: RecallConfig, rng: random.Random, encode, filler: _Filler,
              names: list[str], values: list[int]) -> dict[str, Any]:
    name = rng.choice(names)
    label = rng.randrange(len(values))
    value = values[label]
    target_lag = rng.choice(cfg.lags)
    prefix = filler.tokens(rng.randint(0, cfg.max_prefix_tokens))
    the_id_of, name_ids, is_ = encode(" The ID of"), encode(f" {name}"), encode(" is")
    value_ids = encode(f" {value}")
    dot = encode(".")
    query = the_id_of + name_ids + is_ + value_ids[:-1]  # the values' shared prefix ends the query
    ids = prefix + query + value_ids[-1:]
    fact_position = len(ids) - 1
    gap = max(0, target_lag - len(dot) - len(query))
    ids += dot + filler.tokens(gap, cfg.intervening_facts) + query
    query_position = len(ids) - 1
    ids += value_ids[-1:]
    return {
        "sequence_id": seq_id, "split": split, "name": name, "fact_value": value, "value_label": label,
        "input_ids": ids, "input_text": None, "fact_position": fact_position,
        "query_position": query_position, "answer_position": query_position + 1,
        "lag": query_position - fact_position, "target_lag": target_lag,
        "name_positions": list(range(len(ids) - len(query) - 1 + len(the_id_of),
                                     len(ids) - len(query) - 1 + len(the_id_of) + len(name_ids))),
        "num_intervening_facts": cfg.intervening_facts, "filler": cfg.filler, "num_tokens": len(ids),
    }


def decode_texts(df, tokenizer: Any):
    """Fill ``input_text`` by decoding ``input_ids``."""
    df["input_text"] = [tokenizer.decode(list(ids)) for ids in df["input_ids"]]
    return df
