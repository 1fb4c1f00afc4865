from __future__ import annotations

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
    bigram, trig, closer = dict(r.bigrams), {b: (a, c) for a, b, c in r.skip_trigrams}, dict(r.brackets)
    counts = torch.bincount(rule.flatten(), minlength=len(RULE_NAMES))
    assert torch.all(counts[1:] > 0), counts  # every mechanism occurs
    for seq, lab in zip(tokens.tolist(), rule.tolist()):
        stack = []
        for t in range(1, len(seq)):
            if lab[t] == BIGRAM:
                assert bigram[seq[t - 1]] == seq[t]
            elif lab[t] == SKIP_TRIGRAM:
                a, c = trig[seq[t - 1]]
                assert c == seq[t] and a in seq[:t - 1]
            elif lab[t] == BRACKET:
                assert closer[stack.pop()] == seq[t]
            elif lab[t] == INDUCTION:  # the token after an earlier occurrence of the current token
                prev = seq[t - 1]
                assert any(seq[s] == prev and seq[s + 1] == seq[t] for s in range(t - 1))
            if seq[t] in closer and lab[t] != INDUCTION or lab[t] == INDUCTION and seq[t] in closer:
                stack.append(seq[t])


def test_generation_is_seeded_and_batches_are_deterministic():
    a, b = SyntheticLanguage(seed=1), SyntheticLanguage(seed=1)
    assert a.rules == b.rules and SyntheticLanguage(seed=2).rules != a.rules
    torch.testing.assert_close(a.generate(5)[0], b.generate(5)[0])
    get = a.batches(4, pool_size=32)
    torch.testing.assert_close(get(7)["input_ids"], get(7)["input_ids"])
    assert not torch.equal(get(7)["input_ids"], get(8)["input_ids"])
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
