"""Multi-query associative recall (MQAR) data, generated in vectorized torch.

- :func:`multiquery_ar`: the zoology task (Arora, Eyuboglu et al., "Zoology", 2023), same distribution as
  ``zoology.data.multiquery_ar.multiquery_ar``, including ``num_passes`` (JRT-style repeated context).
- :func:`forgetting_mqar`: some keys are re-assigned a new value later in the context; the answer is the
  latest value (the old one is returned too, to count stale answers).
- :func:`encoder_decoder_mqar`: the encoder-decoder layout of polar-mem-mamba (:data:`PAD`, :data:`BOS`,
  :data:`EOS`, :data:`SEP`, keys in ``[FIRST_KEY, vocab_size // 2)``, values in
  ``[vocab_size // 2, vocab_size)``).

Everything is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and then moved to ``device``,
so a seed gives the same data on every machine. Labels are -100 (``ignore_index``) except at answers.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_KEY = 10
ENC_DEC_VOCAB_SIZE = 8192
_CHUNK_ELEMS = 1 << 22  # bound on the [rows, n] float scratch of one sampling chunk


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_check_int("seed", seed, 0))


def _row_chunks(rows: int, row_elems: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def sample_distinct(gen: torch.Generator, rows: int, k: int, low: int, high: int) -> Tensor:
    """[rows, k] int64: per row, a uniformly random ordered k-tuple of distinct integers in ``[low, high)``.

    Sparse case (``2 k <= high - low``): i.i.d. draws; then, while a row has equal entries, each one but
    the first (by position) is redrawn. Which entries get redrawn depends only on which entries are equal,
    never on the values, so the procedure commutes with relabeling the values and the result is uniform
    over distinct tuples. Dense case: prefixes of random permutations.
    """
    n = high - low
    if k > n:
        raise ValueError(f"k={k}: expected <= high - low = {n}")
    if 2 * k > n:
        out = torch.empty(rows, k, dtype=torch.long)
        for s, e in _row_chunks(rows, n):
            out[s:e] = torch.rand(e - s, n, generator=gen, dtype=torch.float64).argsort(dim=1)[:, :k]
        return out + low
    x = torch.randint(low, high, (rows, k), generator=gen)
    # first pass: sort each row by (value, position); a run of equal values keeps its first position
    bits = max(1, (k - 1).bit_length())
    dtype = torch.int32 if high << bits < 2**31 else torch.long  # int32 sorts faster
    packed = ((x.to(dtype) << bits) | torch.arange(k, dtype=dtype)).sort(dim=1).values
    value = packed >> bits
    r, c = (value[:, 1:] == value[:, :-1]).nonzero(as_tuple=True)
    row, col = r, (packed[r, c + 1] & ((1 << bits) - 1)).long()
    while row.numel():
        x[row, col] = torch.randint(low, high, (row.numel(),), generator=gen)
        # only pairs involving a redrawn entry can be equal now; the later entry of each such pair redraws
        equal = x[row] == x[row, col][:, None]  # [redrawn, k]
        equal[torch.arange(row.numel()), col] = False
        e, other = equal.nonzero(as_tuple=True)
        redo = (row[e] * k + torch.maximum(col[e], other)).unique()
        row, col = redo // k, redo % k
    return x


def power_law_gaps(gen: torch.Generator, rows: int, k: int, space: int, power_a: float) -> Tensor:
    """[rows, k] int64: per row, k distinct slots of ``range(space)`` drawn one after another without
    replacement, slot ``g`` with weight ``(g + 1) ** (power_a - 1)`` (zoology's power law; ``power_a=1`` is
    uniform). Drawn as an exponential race (``E_g / w_g``, smallest first), which has the same ordered
    distribution as successive weighted draws.
    """
    inv_weights = torch.arange(1, space + 1, dtype=torch.float64).pow(1 - power_a).float()
    out = torch.empty(rows, k, dtype=torch.long)
    for s, e in _row_chunks(rows, space):
        # race times E / w with E = -log(U) ~ Exp(1): the k smallest are the k largest of log(U) / w
        neg_race = torch.rand(e - s, space, generator=gen).log_().mul_(inv_weights)
        out[s:e] = neg_race.topk(k, dim=1, largest=True, sorted=True).indices
    return out


def _check_common(vocab_size: int, num_examples: int, input_seq_len: int, num_kv_pairs: int,
                  power_a: float) -> None:
    _check_int("vocab_size", vocab_size, 4)
    _check_int("num_examples", num_examples, 1)
    _check_int("input_seq_len", input_seq_len, 1)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    if not power_a > 0:
        raise ValueError(f"power_a={power_a}: expected > 0 (1.0 is uniform, small values favour short gaps)")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size}: {num_kv_pairs} distinct keys from [1, vocab_size // 2) "
                         f"need vocab_size // 2 - 1 >= num_kv_pairs (vocab_size >= {2 * num_kv_pairs + 2})")


def _fill(gen: torch.Generator, rows: int, cols: int, vocab_size: int, random: bool) -> Tensor:
    if random:
        return torch.randint(0, vocab_size, (rows, cols), generator=gen)
    return torch.zeros(rows, cols, dtype=torch.long)


def _interleave(keys: Tensor, values: Tensor) -> Tensor:
    """[B, N] keys and values -> [B, 2N] ``k1 v1 k2 v2 ...``."""
    return torch.stack([keys, values], dim=-1).flatten(1)


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    num_passes: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """MQAR examples ``(inputs, labels)``, both int64 [num_examples, input_seq_len].

    Per example, N = ``num_kv_pairs`` distinct keys from ``[1, V/2)`` and N distinct values from
    ``[V/2, V)`` (V = ``vocab_size``, V/2 = ``V // 2``). The context ``k1 v1 ... kN vN`` (2N tokens) is
    repeated ``num_passes`` times from position 0; ``ctx = 2 N num_passes``. Then every key is queried
    once: key ``j`` (context order) goes to position ``ctx + 2 g_j``, the slots ``g_1, g_2, ...`` drawn in
    that order without replacement from ``range((L - ctx) // 2)`` with ``p(g) ∝ (g + 1) ** (power_a - 1)``
    (so early keys tend to be queried early, as in zoology). ``labels`` is -100 except
    ``labels[b, ctx + 2 g_j] = v_j``: the model predicts the value at the position of its key (this is the
    next-token shift of a sequence ``... k_j v_j ...`` truncated to L tokens). Every other position holds
    a uniform random token of ``[0, V)`` when ``random_non_queries`` else 0.

    Bounds (ValueError naming the failing one): ``2 N num_passes + 2 N <= input_seq_len`` (the contexts
    plus N query slots of 2 tokens; zoology's assert) and ``V // 2 - 1 >= N`` (distinct keys).
    zoology's other asserts (even ``input_seq_len``, ``vocab_size > input_seq_len``) are not needed here.
    """
    _check_common(vocab_size, num_examples, input_seq_len, num_kv_pairs, power_a)
    _check_int("num_passes", num_passes, 1)
    n, ctx = num_kv_pairs, 2 * num_kv_pairs * num_passes
    if ctx + 2 * n > input_seq_len:
        raise ValueError(f"input_seq_len={input_seq_len}: {num_passes} pass(es) over {n} pairs "
                         f"(2*N*num_passes={ctx}) plus {n} query slots (2*N={2 * n}) need "
                         f"input_seq_len >= {ctx + 2 * n}")
    gen = _generator(seed)
    half = vocab_size // 2
    keys = sample_distinct(gen, num_examples, n, 1, half)
    values = sample_distinct(gen, num_examples, n, half, vocab_size)
    pos = ctx + 2 * power_law_gaps(gen, num_examples, n, (input_seq_len - ctx) // 2, power_a)

    inputs = _fill(gen, num_examples, input_seq_len, vocab_size, random_non_queries)
    inputs[:, :ctx] = _interleave(keys, values).repeat(1, num_passes)
    inputs.scatter_(1, pos, keys)
    labels = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, pos, values)
    return inputs.to(device), labels.to(device)


def forgetting_mqar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    num_reassigned: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """MQAR where R = ``num_reassigned`` keys get a new value later: ``(inputs, labels, stale_labels)``.

    All three are int64 [num_examples, input_seq_len]. The context is the N = ``num_kv_pairs`` original
    pairs ``k1 v1 ... kN vN`` followed by R update pairs ``k_u v'_u`` for a random subset of R keys in
    random order (zoology's ``forgetting_mqar`` layout); ``ctx = 2 (N + R)``. The N + R values of an
    example are distinct, so a new value never equals any old one. Queries are placed as in
    :func:`multiquery_ar` (each key once, power-law slots after ``ctx``); ``labels`` holds the *latest*
    value of the queried key, and ``stale_labels`` holds its overwritten value at the positions of
    re-assigned keys (-100 elsewhere), so ``stale_labels != -100`` marks the re-assigned queries and
    ``(pred == stale_labels)`` counts answers that recalled the old value.

    Bounds: ``0 <= R <= N``, ``2 (N + R) + 2 N <= input_seq_len``, ``V // 2 - 1 >= N`` (keys) and
    ``V - V // 2 >= N + R`` (distinct values).
    """
    _check_common(vocab_size, num_examples, input_seq_len, num_kv_pairs, power_a)
    n, r = num_kv_pairs, _check_int("num_reassigned", num_reassigned, 0)
    if r > n:
        raise ValueError(f"num_reassigned={r}: expected <= num_kv_pairs={n}")
    ctx = 2 * (n + r)
    if ctx + 2 * n > input_seq_len:
        raise ValueError(f"input_seq_len={input_seq_len}: {n} pairs and {r} updates (2*(N+R)={ctx}) plus "
                         f"{n} query slots (2*N={2 * n}) need input_seq_len >= {ctx + 2 * n}")
    half = vocab_size // 2
    if vocab_size - half < n + r:
        raise ValueError(f"vocab_size={vocab_size}: {n + r} distinct values from [vocab_size // 2, "
                         "vocab_size) need vocab_size - vocab_size // 2 >= num_kv_pairs + num_reassigned")
    gen = _generator(seed)
    b = num_examples
    keys = sample_distinct(gen, b, n, 1, half)
    values = sample_distinct(gen, b, n + r, half, vocab_size)
    old, new = values[:, :n], values[:, n:]
    which = sample_distinct(gen, b, r, 0, n)  # indices of the re-assigned keys, in update order
    latest = old.scatter(1, which, new)
    stale = torch.full_like(old, IGNORE_INDEX).scatter_(1, which, old.gather(1, which))
    pos = ctx + 2 * power_law_gaps(gen, b, n, (input_seq_len - ctx) // 2, power_a)

    inputs = _fill(gen, b, input_seq_len, vocab_size, random_non_queries)
    inputs[:, :ctx] = torch.cat([_interleave(keys, old), _interleave(keys.gather(1, which), new)], dim=1)
    inputs.scatter_(1, pos, keys)
    labels = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, pos, latest)
    stale_labels = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, pos, stale)
    return inputs.to(device), labels.to(device), stale_labels.to(device)


def encoder_decoder_mqar(
    num_pairs: int,
    num_queries: int,
    num_examples: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    vocab_size: int = ENC_DEC_VOCAB_SIZE,
    min_pairs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder-decoder MQAR: ``(encoder_ids [B, 2N+2], decoder_ids [B, M+1], targets [B, M+1])``, int64.

    N = ``num_pairs`` distinct keys from ``[FIRST_KEY, V/2)`` and N distinct values from ``[V/2, V)``
    (V = ``vocab_size``; 8192 gives keys 10..4095 and values 4096..8191); M = ``num_queries`` distinct keys
    among the N, in random order::

        encoder_ids = [BOS, k1, v1, ..., kN, vN, EOS]
        decoder_ids = [BOS, q1, ..., qM]
        targets     = [-100, value(q1), ..., value(qM)]

    Alignment: ``targets[:, i]`` is the answer the decoder must emit at position ``i``, where it has just
    read ``q_i`` (``decoder_ids[:, i]``); position 0 (BOS) has no target. Use
    ``cross_entropy(logits.flatten(0, 1), targets.flatten())`` with logits [B, M+1, V] over the decoder.

    ``min_pairs`` (a training mixture, as zoology trains MQAR on several pair counts): example ``b`` holds
    ``n_b`` pairs, uniform in ``[min_pairs, N]``, then EOS and PAD up to the same ``2N+2`` columns; its
    queries are among its own ``n_b`` keys. ``None`` (or ``N``) gives every example N pairs.

    Bounds: ``1 <= M <= N``, ``N <= V // 2 - FIRST_KEY`` (keys) and ``N <= V - V // 2`` (values);
    ``M <= min_pairs <= N``.
    """
    _check_int("num_pairs", num_pairs, 1)
    _check_int("num_queries", num_queries, 1)
    _check_int("num_examples", num_examples, 1)
    _check_int("vocab_size", vocab_size, 2 * FIRST_KEY + 2)
    n, m, half = num_pairs, num_queries, vocab_size // 2
    if m > n:
        raise ValueError(f"num_queries={m}: expected <= num_pairs={n} (queried keys are distinct)")
    if n > half - FIRST_KEY:
        raise ValueError(f"num_pairs={n}: distinct keys from [{FIRST_KEY}, vocab_size // 2 = {half}) allow "
                         f"at most {half - FIRST_KEY}")
    if n > vocab_size - half:
        raise ValueError(f"num_pairs={n}: distinct values from [{half}, {vocab_size}) allow "
                         f"at most {vocab_size - half}")
    if min_pairs is not None and not (_is_int(min_pairs) and m <= min_pairs <= n):
        raise ValueError(f"min_pairs={min_pairs!r}: expected an integer in [num_queries={m}, num_pairs={n}]")
    gen = _generator(seed)
    b = num_examples
    keys = sample_distinct(gen, b, n, FIRST_KEY, half)
    values = sample_distinct(gen, b, n, half, vocab_size)
    col = torch.full((b, 1), BOS, dtype=torch.long)
    if min_pairs is None or min_pairs == n:
        which = sample_distinct(gen, b, m, 0, n)
        encoder_ids = torch.cat([col, _interleave(keys, values), torch.full_like(col, EOS)], dim=1)
    else:
        pairs = torch.randint(min_pairs, n + 1, (b, 1), generator=gen)
        # m distinct pair indices below each row's count: the m smallest of random scores, masked
        scores = torch.rand(b, n, generator=gen).masked_fill(torch.arange(n) >= pairs, 2.0)
        which = scores.argsort(dim=1)[:, :m]
        body = torch.cat([_interleave(keys, values), torch.full_like(col, PAD)], dim=1)  # [B, 2N+1]
        pos = torch.arange(2 * n + 1)
        body = torch.where(pos < 2 * pairs, body, torch.where(pos == 2 * pairs, EOS, PAD))
        encoder_ids = torch.cat([col, body], dim=1)
    decoder_ids = torch.cat([col, keys.gather(1, which)], dim=1)
    targets = torch.cat([torch.full_like(col, IGNORE_INDEX), values.gather(1, which)], dim=1)
    return encoder_ids.to(device), decoder_ids.to(device), targets.to(device)
