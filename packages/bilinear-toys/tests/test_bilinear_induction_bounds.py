"""``bench/induction_bounds.py``: what a copier that matches only the last k tokens pays on induction."""

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def ib(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("induction_bounds", None)
    import induction_bounds

    return induction_bounds


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
