"""seqmem_shared.data.mqar: zoology-format MQAR, forgetting MQAR, encoder-decoder MQAR."""

from __future__ import annotations

import itertools

import pytest
import torch
from seqmem_shared.data.mqar import (
    BOS,
    EOS,
    FIRST_KEY,
    IGNORE_INDEX,
    PAD,
    encoder_decoder_mqar,
    forgetting_mqar,
    multiquery_ar,
    power_law_gaps,
    sample_distinct,
)


def _queries(inputs: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, n] of the answers (sorted) and the input tokens there."""
    mask = labels != IGNORE_INDEX
    assert (mask.sum(1) == n).all()  # one label per query, n queries per example
    pos = mask.nonzero()[:, 1].view(-1, n)
    return pos, inputs.gather(1, pos)


def _lookup(keys: torch.Tensor, values: torch.Tensor, queried: torch.Tensor) -> torch.Tensor:
    """values[b, j] where keys[b, j] == queried[b, i] (asserting exactly one match)."""
    match = queried[:, :, None] == keys[:, None, :]
    assert (match.sum(-1) == 1).all()
    return values.gather(1, match.float().argmax(-1))


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square of ``counts`` against ``probs``: below dof + 5 sd (false alarms ~1e-5)."""
    expected = probs.double() * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = counts.numel() - 1
    return chi2 < dof + 5 * (2 * dof) ** 0.5


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_multiquery_ar_format(random_non_queries):
    v, b, length, n = 64, 300, 48, 6
    inputs, labels = multiquery_ar(v, b, length, n, random_non_queries=random_non_queries, seed=3)
    assert inputs.shape == labels.shape == (b, length) and inputs.dtype == labels.dtype == torch.long
    keys, values = inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2]
    assert keys.min() >= 1 and keys.max() < v // 2 and values.min() >= v // 2 and values.max() < v
    assert (keys.sort(1).values.diff(dim=1) != 0).all() and (values.sort(1).values.diff(dim=1) != 0).all()
    pos, queried = _queries(inputs, labels, n)
    assert (pos >= 2 * n).all() and ((pos - 2 * n) % 2 == 0).all()
    # every key is queried exactly once, and the label at the key's own position is its value
    assert torch.equal(queried.sort(1).values, keys.sort(1).values)
    assert torch.equal(labels.gather(1, pos), _lookup(keys, values, queried))
    assert (labels[:, : 2 * n] == IGNORE_INDEX).all()
    filler = torch.ones_like(inputs, dtype=torch.bool)
    filler[:, : 2 * n] = False
    filler.scatter_(1, pos, False)
    if random_non_queries:
        assert inputs[filler].min() >= 0 and inputs[filler].max() < v and inputs[filler].float().std() > 10
    else:
        assert (inputs[filler] == 0).all()


def test_multiquery_ar_passes_repeat_the_context():
    n, passes = 4, 3
    inputs, labels = multiquery_ar(50, 20, 40, n, num_passes=passes, seed=0)
    ctx = inputs[:, : 2 * n]
    for p in range(passes):
        assert torch.equal(inputs[:, 2 * n * p: 2 * n * (p + 1)], ctx)
    pos, _ = _queries(inputs, labels, n)
    assert (pos >= 2 * n * passes).all()


def test_multiquery_ar_seeds_and_device():
    a = multiquery_ar(128, 64, 64, 8, seed=5)
    b = multiquery_ar(128, 64, 64, 8, seed=5, device=torch.device("cpu"))
    c = multiquery_ar(128, 64, 64, 8, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_power_law_gaps_skew_towards_small_gaps():
    n, length = 4, 8 + 2 * 60
    _, labels = multiquery_ar(4096, 4000, length, n, power_a=0.01, seed=0)
    gaps = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 2 * n) // 2
    hist = torch.bincount(gaps, minlength=60).float()
    assert hist[:5].sum() > 5 * hist[-5:].sum()  # p(gap) ∝ (gap + 1) ** -0.99
    _, uniform = multiquery_ar(4096, 4000, length, n, power_a=1.0, seed=0)
    hist_u = torch.bincount(((uniform != IGNORE_INDEX).nonzero()[:, 1] - 2 * n) // 2, minlength=60).float()
    assert hist_u[:5].sum() < 1.5 * hist_u[-5:].sum()


def test_power_law_gaps_are_successive_weighted_draws():
    # successive draws without replacement, as numpy's choice(replace=False, p): P(i, j) = p_i p_j / (1 - p_i)
    space, a, rows = 4, 0.3, 40000
    w = torch.arange(1, space + 1, dtype=torch.float64) ** (a - 1)
    p = w / w.sum()
    pairs = [(i, j) for i, j in itertools.permutations(range(space), 2)]
    gaps = power_law_gaps(torch.Generator().manual_seed(0), rows, 2, space, a)
    assert (gaps[:, 0] != gaps[:, 1]).all()
    counts = torch.bincount(gaps[:, 0] * space + gaps[:, 1], minlength=space * space).double()
    counts = counts[[i * space + j for i, j in pairs]]
    assert _chi2_ok(counts, torch.tensor([(p[i] * p[j] / (1 - p[i])).item() for i, j in pairs]))
    # the order of the draws matters: the swapped assignment is rejected
    assert not _chi2_ok(counts, torch.tensor([(p[j] * p[i] / (1 - p[j])).item() for i, j in pairs]))


@pytest.mark.parametrize("n,k", [(6, 3), (5, 3)])  # rejection path (2k <= n) and permutation path
def test_sample_distinct_is_uniform_over_ordered_tuples(n, k):
    rows = 30000
    x = sample_distinct(torch.Generator().manual_seed(1), rows, k, 10, 10 + n)
    assert x.min() >= 10 and x.max() < 10 + n
    assert (x.sort(1).values.diff(dim=1) != 0).all()
    counts = torch.bincount(((x - 10) * torch.tensor([n * n, n, 1])).sum(1), minlength=n**3).double()
    tuples = [(i * n + j) * n + l for i, j, l in itertools.permutations(range(n), 3)]
    assert _chi2_ok(counts[tuples], torch.full((len(tuples),), 1 / len(tuples)))


def test_forgetting_mqar_answers_are_latest_values():
    v, b, length, n, r = 100, 200, 64, 6, 3
    inputs, labels, stale = forgetting_mqar(v, b, length, n, r, seed=2)
    assert inputs.shape == labels.shape == stale.shape == (b, length)
    keys, old = inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2]
    upd_keys, new = inputs[:, 2 * n:2 * (n + r):2], inputs[:, 2 * n + 1:2 * (n + r):2]
    assert (upd_keys.sort(1).values.diff(dim=1) != 0).all()
    # the N + R values are distinct: a new value never repeats an old one
    assert (torch.cat([old, new], 1).sort(1).values.diff(dim=1) != 0).all()
    latest = old.clone()
    for row in range(b):
        for key, value in zip(upd_keys[row].tolist(), new[row].tolist()):
            latest[row, keys[row].tolist().index(key)] = value
    pos, queried = _queries(inputs, labels, n)
    assert (pos >= 2 * (n + r)).all()
    assert torch.equal(labels.gather(1, pos), _lookup(keys, latest, queried))
    # stale labels: the overwritten value exactly at the queries of re-assigned keys
    was_updated = (queried[:, :, None] == upd_keys[:, None, :]).any(-1)
    stale_at = stale.gather(1, pos)
    assert ((stale != IGNORE_INDEX).sum(1) == r).all()
    assert torch.equal(stale_at != IGNORE_INDEX, was_updated)
    assert torch.equal(stale_at[was_updated], _lookup(keys, old, queried)[was_updated])
    # no re-assignment: plain MQAR answers
    inputs0, labels0, stale0 = forgetting_mqar(v, 10, length, n, 0, seed=2)
    assert (stale0 == IGNORE_INDEX).all()
    pos0, q0 = _queries(inputs0, labels0, n)
    assert torch.equal(labels0.gather(1, pos0), _lookup(inputs0[:, 0:2 * n:2], inputs0[:, 1:2 * n:2], q0))


def test_encoder_decoder_layout():
    n, m, b = 12, 5, 100
    enc, dec, tgt = encoder_decoder_mqar(n, m, b, seed=4)
    assert enc.shape == (b, 2 * n + 2) and dec.shape == tgt.shape == (b, m + 1)
    assert (enc[:, 0] == BOS).all() and (enc[:, -1] == EOS).all() and (dec[:, 0] == BOS).all()
    keys, values = enc[:, 1:-1:2], enc[:, 2:-1:2]
    assert keys.min() >= 10 and keys.max() <= 4095 and values.min() >= 4096 and values.max() <= 8191
    assert (keys.sort(1).values.diff(dim=1) != 0).all() and (values.sort(1).values.diff(dim=1) != 0).all()
    queries = dec[:, 1:]
    assert (queries.sort(1).values.diff(dim=1) != 0).all()
    assert (tgt[:, 0] == IGNORE_INDEX).all()
    assert torch.equal(tgt[:, 1:], _lookup(keys, values, queries))  # target at the position of its query
    again = encoder_decoder_mqar(n, m, b, seed=4)
    assert all(torch.equal(x, y) for x, y in zip((enc, dec, tgt), again))
    assert not torch.equal(enc, encoder_decoder_mqar(n, m, b, seed=5)[0])
    # every key can be queried (M == N) and a small vocabulary moves the ranges
    enc2, dec2, _ = encoder_decoder_mqar(8, 8, 10, vocab_size=64)
    assert torch.equal(dec2[:, 1:].sort(1).values, enc2[:, 1:-1:2].sort(1).values)
    assert enc2[:, 1:-1:2].max() < 32 and enc2[:, 2:-1:2].min() >= 32


def test_encoder_decoder_mixture_of_pair_counts():
    n, m, b = 12, 3, 400
    enc, dec, tgt = encoder_decoder_mqar(n, m, b, seed=4, min_pairs=4)
    assert enc.shape == (b, 2 * n + 2) and dec.shape == tgt.shape == (b, m + 1)
    counts = (enc[:, 1:] >= FIRST_KEY).sum(1) // 2  # the content: pairs up to EOS, then PAD only
    assert counts.min() == 4 and counts.max() == n and len(counts.unique()) == n - 3
    for row, c in zip(enc, counts.tolist()):
        assert (row[1:2 * c + 1] >= FIRST_KEY).all() and row[2 * c + 1] == EOS
        assert (row[2 * c + 2:] == PAD).all()
    keys, values = enc[:, 1:-1:2], enc[:, 2:-1:2]
    queries = dec[:, 1:]
    assert (queries.sort(1).values.diff(dim=1) != 0).all()
    assert torch.equal(tgt[:, 1:], _lookup(keys, values, queries))  # every query is a present key
    where = (keys[:, :, None] == queries[:, None, :]).float().argmax(1)  # [B, M]: each query's pair index
    assert (keys.gather(1, where) == queries).all() and (where < counts[:, None]).all()
    # without a mixture the stream is the plain one
    plain = encoder_decoder_mqar(n, m, b, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(plain, encoder_decoder_mqar(n, m, b, seed=4, min_pairs=n)))


@pytest.mark.parametrize("call,match", [
    (lambda: encoder_decoder_mqar(8, 4, 2, min_pairs=3), r"min_pairs=3: expected an integer in \[num_q"),
    (lambda: encoder_decoder_mqar(8, 4, 2, min_pairs=9), "min_pairs=9"),
    (lambda: encoder_decoder_mqar(1, 1, 2, min_pairs=True), "min_pairs=True"),
    (lambda: multiquery_ar(128, 4, 31, 8), "input_seq_len=31.*>= 32"),
    (lambda: multiquery_ar(128, 4, 48, 8, num_passes=3), "input_seq_len=48.*>= 64"),
    (lambda: multiquery_ar(16, 4, 64, 8), "vocab_size=16.*distinct keys"),
    (lambda: multiquery_ar(128, 4, 64, 8, power_a=0.0), "power_a"),
    (lambda: multiquery_ar(128, 0, 64, 8), "num_examples"),
    (lambda: forgetting_mqar(128, 4, 64, 4, 5), "num_reassigned=5"),
    (lambda: forgetting_mqar(128, 4, 19, 4, 2), "input_seq_len=19.*>= 20"),
    (lambda: forgetting_mqar(20, 4, 64, 8, 4), "vocab_size=20.*distinct values"),
    (lambda: encoder_decoder_mqar(4, 5, 2), "num_queries=5"),
    (lambda: encoder_decoder_mqar(4087, 4, 2), "num_pairs=4087.*keys"),
    (lambda: encoder_decoder_mqar(4, 2, 2, seed=-1), "seed"),
])
def test_impossible_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
