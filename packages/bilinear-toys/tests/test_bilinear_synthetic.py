from __future__ import annotations

import math

import pytest
import torch
from bilinear_toys.data import RULE_NAMES, SyntheticLanguage, repeated_random_tokens
from bilinear_toys.data.synthetic import BIGRAM, BRACKET, INDUCTION, SKIP_TRIGRAM


def test_rules_hold_in_generated_sequences():
    lang = SyntheticLanguage(vocab_size=96, seq_len=48, seed=3)
    tokens, rule = lang.generate(60)
    assert tokens.shape == rule.shape == (60, 48) and torch.all(tokens[:, 0] == 0)
    assert tokens.max() < 96
    r = lang.rules
    bigram, trig = dict(r.bigrams), {b: (a, c) for a, b, c in r.skip_trigrams}
    counts = torch.bincount(rule.flatten(), minlength=len(RULE_NAMES))
    assert torch.all(counts[1:] > 0), counts  # every mechanism occurs
    opener = {c: o for o, c in r.brackets}
    for seq, lab in zip(tokens.tolist(), rule.tolist()):
        for t in range(1, len(seq)):
            if lab[t] == BIGRAM:
                assert bigram[seq[t - 1]] == seq[t]
            elif lab[t] == SKIP_TRIGRAM:
                a, c = trig[seq[t - 1]]
                assert c == seq[t] and a in seq[:t - 1]
            elif lab[t] == BRACKET:  # closes a bracket opened earlier (copied openers do not open one)
                assert seq[t] in opener and opener[seq[t]] in seq[:t]
            elif lab[t] == INDUCTION:  # the token after an earlier occurrence of the current token
                prev = seq[t - 1]
                assert any(seq[s] == prev and seq[s + 1] == seq[t] for s in range(t - 1))


def test_loss_floor_is_the_generators_own_log_loss():
    lang = SyntheticLanguage(vocab_size=64, seq_len=40, seed=2)
    tokens, rule, nll = lang.generate(40, return_nll=True)
    torch.testing.assert_close(lang.generate(40)[0], tokens)  # return_nll does not change the draw
    assert torch.all(nll[rule != 0].eq(0) | (rule[rule != 0] == BRACKET))  # deterministic rules cost 0
    assert torch.all(nll[:, 1:][rule[:, 1:] == 0] > 0) and nll.isfinite().all()
    seq = tokens[0].tolist()
    for stack in ([], [1]):
        p = lang._random_event_probs(seq[:30], stack)
        assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all()
    # a model that predicts uniformly pays log V everywhere: far above the floor
    assert nll[:, 1:].mean() < 0.8 * math.log(64)


def test_generation_is_seeded_and_batches_are_deterministic():
    a, b = SyntheticLanguage(seed=1), SyntheticLanguage(seed=1)
    assert a.rules == b.rules and SyntheticLanguage(seed=2).rules != a.rules
    torch.testing.assert_close(a.generate(5)[0], b.generate(5)[0])
    get = a.batches(4)
    torch.testing.assert_close(get(7)["input_ids"], get(7)["input_ids"])
    assert not torch.equal(get(7)["input_ids"], get(8)["input_ids"])
    pooled = a.batches(4, pool_size=12)
    torch.testing.assert_close(pooled(1)["input_ids"], a.generate_many(12)[4:8])
    torch.testing.assert_close(pooled(3)["input_ids"], pooled(0)["input_ids"])  # cycles
    torch.testing.assert_close(a.generate_many(1100, chunk=512, workers=2), a.generate_many(1100, chunk=512))
    assert set(a.rules.to_dict()) == {"bigrams", "skip_trigrams", "brackets", "fillers"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="vocab_size=20: too small"):
        SyntheticLanguage(vocab_size=20)
    with pytest.raises(ValueError, match="span_len="):
        SyntheticLanguage(seq_len=10, span_len=(4, 8))


def test_repeated_random_tokens():
    x = repeated_random_tokens(10, 5, 3, bos=0)
    assert x.shape == (3, 11) and torch.all(x[:, 0] == 0)
    torch.testing.assert_close(x[:, 1:6], x[:, 6:])
