"""``bench/mechanism_bounds.py``: what short-match copiers and counting closers pay, no model involved."""

import math
from types import SimpleNamespace

import pytest


@pytest.fixture()
def ib(bench):
    return bench("mechanism_bounds")


def test_a_longer_match_names_the_replayed_source(ib):
    # predicting the last 7: "5" was followed by 7 (after a 3) and by 8 (after a 4); the context is "3 5"
    seq = [0, 3, 5, 7, 4, 5, 8, 3, 5, 7]
    assert ib.ambiguity_cost(seq, 9, k=1) == pytest.approx(math.log(2))
    assert ib.ambiguity_cost(seq, 9, k=2) == 0.0
    assert ib.ambiguity_cost([0, 1, 2, 3], 3, k=1) == math.inf  # "2" never occurred before


def test_span_end_cost_counting_beats_blind_and_vanishes_for_fixed_spans(ib):
    cost = ib.span_end_cost((4, 8))
    assert 0 < cost["counting"] < cost["blind"]
    # spans of 4..8: 5 induction tokens and 0.8 stops per span on average
    assert cost["blind_rate"] == pytest.approx(5 / 5.8)
    assert ib.span_end_cost((4, 4)) == {"counting": 0.0, "blind": 0.0, "blind_rate": 1.0}


def test_bounds_on_a_small_language(ib):
    from bilinear_toys.data.synthetic import SyntheticLanguage

    out = ib.bounds(SyntheticLanguage(vocab_size=64, seq_len=33, seed=0), sequences=64, ks=(1, 4))
    assert out["induction_tokens"] == sum(v["count"] for v in out["achievable_by_span_position"].values()) > 0
    assert min(out["achievable_by_span_position"]) == 2 and out["achievable"] > 0
    one, four = out["ambiguity_cost"]["k=1"], out["ambiguity_cost"]["k=4"]
    assert one["share_impossible"] == 0.0  # the replayed source always matches one token
    assert 0 <= four["share_hedged"] <= one["share_hedged"] <= 1
    assert out["bracket"]["achievable"] > 0 and 0 <= out["bracket"]["share_both_types_open"] <= 1


def test_the_counting_closer_hedges_only_when_both_bracket_types_are_open(ib):
    from bilinear_toys.data.synthetic import BRACKET, NONE

    lang = SimpleNamespace(rules=SimpleNamespace(brackets=[(1, 2), (3, 4)]))
    # ( [ ( ] ) in tokens 3 1 3 4 2: both closes happen with both types open; the most recent opener
    # (3) names the first closer but not the second, so q = 1/2
    out = ib.bracket_costs(lang, [[0, 3, 1, 3, 4, 2]], [[NONE] * 4 + [BRACKET] * 2])
    assert out["closes"] == 2 and out["share_both_types_open"] == 1.0 and out["q_most_recent_opener"] == 0.5
    assert out["counting_closer_cost"] == pytest.approx(math.log(2)) and out["share_token_stack_right"] == 1.0
    # one type open: no hedging at all
    out = ib.bracket_costs(lang, [[0, 1, 1, 2]], [[NONE] * 3 + [BRACKET]])
    assert out["share_both_types_open"] == 0.0 and out["counting_closer_cost"] == 0.0
