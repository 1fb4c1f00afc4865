from __future__ import annotations

import pytest
from retnet_forgetting.data.recall import RecallConfig, generate_recall_dataset
from seqmem_shared.tokenization import get_tokenizer


@pytest.mark.parametrize("tok", ["gpt2", "bytes"])
@pytest.mark.parametrize("filler", ["prose", "facts", "random"])
def test_positions_lags_and_splits(tok, filler):
    t = get_tokenizer(tok)
    cfg = RecallConfig(num_sequences=60, lags=[30, 80], filler=filler, intervening_facts=1, num_names=30)
    df = generate_recall_dataset(cfg, t)
    assert len(df) == 60 and set(df["split"]) == {"train", "val", "test"}
    names = {s: set(df[df["split"] == s]["name"]) for s in ("train", "val", "test")}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["val"])
    values = df.attrs["values"]
    for r in df.itertuples():
        ids = list(r.input_ids)
        assert r.lag == r.query_position - r.fact_position == r.target_lag
        assert r.answer_position == r.query_position + 1 == len(ids) - 1
        assert ids[r.fact_position] == ids[r.answer_position]  # the fact's value token is the answer
        assert values[r.value_label] == r.fact_value
        assert t.decode([ids[p] for p in r.name_positions]).strip() == r.name
        fact = t.decode(ids[max(0, r.fact_position - len(r.name_positions) - 8):r.fact_position + 1])
        assert f"{r.name} is {r.fact_value}" in fact


def test_corpus_filler_and_bad_config(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Once upon a time there was a quiet lake. " * 20)
    df = generate_recall_dataset(RecallConfig(num_sequences=9, lags=[40], filler="corpus",
                                              corpus_path=str(corpus), num_names=12), get_tokenizer("gpt2"))
    assert "lake" in get_tokenizer("gpt2").decode(list(df.iloc[0]["input_ids"]))
    with pytest.raises(ValueError, match="filler"):
        RecallConfig(filler="music")
    with pytest.raises(ValueError, match="corpus_path"):
        RecallConfig(filler="corpus")
    with pytest.raises(ValueError, match="lags"):
        RecallConfig(lags=[0])


def test_custom_names_and_values():
    t = get_tokenizer("gpt2")
    names = [f"Person{i}" for i in range(12)]
    cfg = RecallConfig(num_sequences=24, lags=[30], names=names, values=[10, 20, 30])
    df = generate_recall_dataset(cfg, t)
    assert set(df["name"]) <= set(names) and set(df["fact_value"]) <= {10, 20, 30}
    assert df.attrs["values"] == [10, 20, 30]
    with pytest.raises(ValueError, match="values"):
        generate_recall_dataset(RecallConfig(num_sequences=9, lags=[30], names=names, values=[7, 123456]), t)


def test_names_do_not_depend_on_the_hash_seed():
    """Ranks under torchrun (and reruns) must build the same dataset: no set-order dependence."""
    import os
    import subprocess
    import sys

    code = "from retnet_forgetting.data.recall import make_names; print(make_names(40, 3))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1 and outs.pop().count("'") == 80
