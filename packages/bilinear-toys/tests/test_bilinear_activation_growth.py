"""``bench/activation_growth.py``: per-block activation sizes while a toy model trains."""

import math

import pytest


@pytest.fixture()
def ag(bench):
    return bench("activation_growth")


TINY = {"d_model": 16, "n_head": 2, "vocab_size": 64, "n_ctx": 20, "init": "unit", "batch_size": 4,
        "warmup": 1, "seed": 0}


def test_records_every_block_and_stops_at_the_first_non_finite_loss(ag):
    records = list(ag.train_and_watch("transformer_2L", lr=1e-3, steps=4, every=2, **TINY))
    assert [r["step"] for r in records] == [0, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and len(r["blocks"]) == 2
        for b in r["blocks"]:
            assert set(b) == {"attn_out_rms", "attn_out_max", "mlp_out_rms", "mlp_out_max", "resid_post_rms",
                              "resid_post_max", "argmax_position"}
            assert 0 <= b["attn_out_rms"] <= b["attn_out_max"] and 0 <= b["argmax_position"] < 20
    first = records[0]["blocks"][0]
    assert first["attn_out_max"] == first["mlp_out_max"] == 0.0  # zero-initialized output projections
    # attention-only blocks have no MLP entry; a rate far too high ends the run at its first non-finite loss
    records = list(ag.train_and_watch("attention_only_3L", lr=30.0, steps=200, every=1000, **TINY))
    assert "mlp_out_max" not in records[0]["blocks"][0]
    assert not math.isfinite(records[-1]["loss"]) and records[-1]["step"] < 199
    assert all(math.isfinite(r["loss"]) for r in records[:-1])
