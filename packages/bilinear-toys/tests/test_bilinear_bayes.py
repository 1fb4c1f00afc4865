"""The achievable loss (exact Bayes filter over the generator's hidden state) and the vectorized sampler."""

import math

import torch
from bilinear_toys.data import SyntheticLanguage
from bilinear_toys.data.bayes import BayesFilter, bayes_nll

TINY = dict(vocab_size=12, n_bigrams=1, n_skip_trigrams=1, n_brackets=1, span_len=(2, 2), p_copy=0.4,
            p_bracket=0.2, seed=3)


def test_predictive_is_a_distribution_that_allows_every_sampled_token():
    lang = SyntheticLanguage(seq_len=14, **TINY)
    tokens, _ = lang.generate(30, seed=1)
    f = BayesFilter(lang)
    for row in tokens.tolist():
        f.start(row[0])
        for x in row[1:]:
            p = f.predictive()
            assert abs(p.sum() - 1) < 1e-12 and p[x] > 0
            f.step(x)


def test_equals_the_generator_floor_without_hidden_state_and_exceeds_it_with_copies():
    quiet = SyntheticLanguage(seq_len=24, **{**TINY, "p_copy": 0.0})
    tokens, _, nll = quiet.generate(40, return_nll=True)
    torch.testing.assert_close(bayes_nll(quiet, tokens), nll, rtol=0, atol=1e-12)
    lang = SyntheticLanguage(seq_len=20, **TINY)
    tokens, rule, nll = lang.generate(100, return_nll=True)
    b = bayes_nll(lang, tokens)
    copied = rule == 3
    assert b[copied].mean() > 0.05 > nll[copied].mean()  # the replay is not certain from the tokens
    assert b[:, 1:].mean() > nll[:, 1:].mean()


def test_predictive_matches_sampled_continuations():
    lang = SyntheticLanguage(seq_len=6, **TINY)
    tokens, _ = lang.sample(100_000, seed=0)
    prefixes, counts = tokens[:, :4].unique(dim=0, return_counts=True)
    prefix = prefixes[counts.argmax()]  # the next token (t = 4) may start a copy
    nxt = tokens[(tokens[:, :4] == prefix).all(1), 4]
    empirical = torch.bincount(nxt, minlength=lang.vocab_size).double() / len(nxt)
    f = BayesFilter(lang)
    f.start(int(prefix[0]))
    for x in prefix[1:].tolist():
        f.step(x)
    exact = torch.from_numpy(f.predictive())
    assert len(nxt) > 1000 and (empirical - exact).abs().sum() / 2 < 0.06


def test_vectorized_sampler_matches_the_generator():
    lang = SyntheticLanguage(vocab_size=40, seq_len=33, seed=2)
    fast, fast_rule = lang.sample(3000, seed=0)
    slow, slow_rule = lang.generate(3000, seed=0)
    assert (fast[:, 0] == 0).all() and fast.shape == slow.shape
    f_freq = torch.bincount(fast_rule[:, 1:].flatten(), minlength=5).double() / fast_rule[:, 1:].numel()
    s_freq = torch.bincount(slow_rule[:, 1:].flatten(), minlength=5).double() / slow_rule[:, 1:].numel()
    assert (f_freq - s_freq).abs().max() < 0.01
    b_fast, b_slow = bayes_nll(lang, fast[:400]), bayes_nll(lang, slow[:400])
    assert math.isfinite(b_fast.sum()) and abs(b_fast.mean() - b_slow.mean()) < 0.05
