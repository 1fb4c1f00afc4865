from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from retnet_forgetting.cli import main
from retnet_forgetting.loading import load_retnet_model
from retnet_forgetting.pipeline import build_model, extract, load_config, merge_config
from retnet_forgetting.store import StateStore
from seqmem_shared.tokenization import get_tokenizer

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "vocab_size": 259}


def _config(out):
    return {
        "out_dir": str(out), "tokenizer": "bytes",
        "model": {"config": TINY_MODEL, "dtype": "float32", "implementation": "reference", "device": "cpu"},
        "dataset": {"num_sequences": 60, "lags": [24, 200], "filler": "random", "num_names": 30},
        "extraction": {"batch_size": 16, "shard_rows": 40, "dtype": "float32",
                       "reduction": {"kind": "bilinear", "rank_k": 4, "rank_v": 4}},
        "probes": {"kinds": ["ridge", "logistic"], "groups": ["head", "layer"],
                   "logistic": {"max_steps": 20}},
    }


def test_run_end_to_end_and_resume(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "out")))
    assert main(["run", "--config", str(path)]) == 0
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "Memory half-life per head" in report and "accuracy_vs_lag_ridge_head.png" in report
    curves = pd.read_csv(out / "curves.csv")
    probes = {"ridge_head", "ridge_layer", "logistic_head", "logistic_layer", "readout_head", "model_answer"}
    assert set(curves["probe"]) == probes
    assert set(curves["lag"]) == {24, 200} and curves["accuracy"].between(0, 1).all()
    assert (out / "heatmap_ridge_head.png").stat().st_size > 1000
    store = StateStore(out / "states")
    assert len(store.manifest["shards"]) == 2 and not store.pending()
    mtime = (out / "states" / "shard_00000.safetensors").stat().st_mtime
    cfg = load_config(path)  # resume: finished shards are not re-extracted
    df = pd.read_parquet(out / "dataset.parquet")
    extract(cfg, build_model(cfg, get_tokenizer("bytes")), df, out / "states")
    assert (out / "states" / "shard_00000.safetensors").stat().st_mtime == mtime


def test_config_errors(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown keys"):
        merge_config({"modle": {}})
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["run", "--config", str(tmp_path / "missing.yaml")])


def test_train_tiny_saves_a_loadable_model(tmp_path):
    cfg = {"model": TINY_MODEL, "implementation": "reference", "device": "cpu",
           "dataset": {"num_sequences": 60, "lags": [20], "num_names": 30},
           "train": {"max_steps": 3, "warmup_steps": 1, "batch_size": 4, "eval_every": 3, "log_every": 1,
                     "save_every": 0}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train-tiny", "--config", str(path), "--out-dir", str(tmp_path / "tiny")]) == 0
    model, _ = load_retnet_model(tmp_path / "tiny" / "model", device="cpu", dtype=torch.float32,
                                 implementation="reference")
    assert model.config.hidden_size == 32
    assert (tmp_path / "tiny" / "train_summary.json").exists()


def _recall_rows(n=40, lags=(20, 100)):
    from retnet_forgetting.data.recall import RecallConfig, generate_recall_dataset

    cfg = RecallConfig(num_sequences=n, lags=list(lags), filler="random", num_names=30)
    return generate_recall_dataset(cfg, get_tokenizer("bytes"))


def test_lag_batches_bucket_by_lag_and_curriculum():
    from retnet_forgetting.train import LagBatches

    df = _recall_rows(lags=(20, 100, 300))
    batches = LagBatches(df, batch_size=6, curriculum=3)
    short = max(df[df["target_lag"] == 20]["num_tokens"])
    for index in (0, 1, 2, 5, 9):
        b = batches(index)
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape[0] == 6
        assert ids.shape[1] % 64 == 0 or ids.shape[1] in {g[0].shape[1] for g in batches.groups}
        answer = (labels != -100).nonzero()
        assert answer.shape[0] == 6  # exactly one supervised token per row: the value after the query
        lengths = b["attention_mask"].sum(1)
        assert (answer[:, 1] == lengths - 1).all()
        if index == 0:  # curriculum: the first batch holds the shortest lag only
            assert int(lengths.max()) <= short
    widths = {batches(i)["input_ids"].shape[1] for i in range(3, 40)}
    assert len(widths) >= 3  # every lag after the curriculum
    torch.testing.assert_close(batches(7)["input_ids"], batches(7)["input_ids"])  # deterministic in index


class _Peek(torch.nn.Module):
    """Cheats: its logits at position t are one-hot at token t + 1 (the answer at the query)."""

    def __init__(self, vocab=259, constant=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.constant = vocab, constant

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1) if self.constant is None else torch.full_like(input_ids,
                                                                                                self.constant)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float() + self.w})()


def test_model_answer_accuracy_by_lag():
    from retnet_forgetting.train import answer_tokens, predict_answers, recall_accuracy_by_lag

    df = _recall_rows(n=30)
    acc = recall_accuracy_by_lag(_Peek(), df, batch_size=4)  # batches sorted by length, answers put back
    assert acc == {"recall_acc": 1.0, "recall_acc_lag20": 1.0, "recall_acc_lag100": 1.0}
    value = int(answer_tokens(df)[0])
    pred = predict_answers(_Peek(constant=value), df, batch_size=7)
    assert (pred == value).all()
    padded = predict_answers(_Peek(), df, batch_size=7, fixed_shape=True)  # one [7, 64 * 2^k] shape
    assert (padded == answer_tokens(df)).all()
    const = recall_accuracy_by_lag(_Peek(constant=value), df)["recall_acc"]
    assert const == float((answer_tokens(df) == value).mean()) < 1


def test_train_tiny_time_limit_and_bad_value(tmp_path):
    import json

    import pytest
    from retnet_forgetting.train import load_train_config, train_tiny

    cfg = load_train_config(None)
    cfg.update(out_dir=str(tmp_path / "t"), device="cpu", implementation="reference", model=TINY_MODEL,
               dataset={"num_sequences": 40, "lags": [20, 60], "num_names": 30})
    cfg["train"].update(max_steps=50, warmup_steps=1, batch_size=2, eval_every=0, save_every=0, eval_rows=8,
                        time_limit_s=1e-6, curriculum_steps=10, progress=False)
    train_tiny(cfg)
    summary = json.loads((tmp_path / "t" / "train_summary.json").read_text())
    assert summary["steps"] == 1 and "eval_recall_acc_lag20" in summary["metrics"]
    cfg["train"]["time_limit_s"] = 0
    with pytest.raises(ValueError, match="time_limit_s"):
        train_tiny(cfg)


def test_cli_set_overrides():
    import pytest
    from retnet_forgetting.cli import apply_overrides

    cfg = merge_config({"model": {"name_or_path": "a"}})
    sets = ["model.name_or_path=/x/model", "dataset.lags=[16, 64]", "probes.logistic.max_steps=7"]
    apply_overrides(cfg, sets)
    assert cfg["model"]["name_or_path"] == "/x/model" and cfg["dataset"]["lags"] == [16, 64]
    assert cfg["probes"]["logistic"]["max_steps"] == 7
    bad_sets = (("modle.x=1", "unknown key"), ("model.name_or_path.x=1", "not a mapping"), ("model", "="))
    for bad, match in bad_sets:
        with pytest.raises(ValueError, match=match):
            apply_overrides(cfg, [bad])


def test_lag_batches_with_a_fixed_token_count():
    import pytest
    from retnet_forgetting.train import LagBatches

    df = _recall_rows(lags=(20, 100, 300))  # rows up to ~340 tokens -> lengths 64, 128/192 -> 256, 512
    batches = LagBatches(df, batch_size=3, tokens_per_batch=1024)
    shapes = {tuple(batches(i)["input_ids"].shape) for i in range(30)}
    assert all(b * t == 1024 and t in (64, 128, 256, 512) for b, t in shapes) and len(shapes) >= 2
    b = batches(5)
    answer = (b["labels"] != -100).int().argmax(1)
    assert ((b["labels"] != -100).sum(1) == 1).all() and (answer == b["attention_mask"].sum(1) - 1).all()
    with pytest.raises(ValueError, match="tokens_per_batch"):
        LagBatches(df, batch_size=3, tokens_per_batch=768)


def test_train_tiny_saves_the_model_on_sigterm(tmp_path, monkeypatch):
    import json
    import signal

    from retnet_forgetting import train

    calls = []
    original = train.LagBatches.__call__

    def terminate_at_third_batch(self, index):
        calls.append(index)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)  # as `timeout` would
        return original(self, index)

    monkeypatch.setattr(train.LagBatches, "__call__", terminate_at_third_batch)
    before = signal.getsignal(signal.SIGTERM)
    cfg = train.load_train_config(None)
    cfg.update(out_dir=str(tmp_path / "t"), device="cpu", implementation="reference", model=TINY_MODEL,
               dataset={"num_sequences": 40, "lags": [20, 60], "num_names": 30})
    cfg["train"].update(max_steps=50, warmup_steps=1, batch_size=2, eval_every=0, save_every=0, eval_rows=8,
                        progress=False)
    model_dir = train.train_tiny(cfg)
    summary = json.loads((tmp_path / "t" / "train_summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == 2 and (model_dir / "config.json").exists()
    assert signal.getsignal(signal.SIGTERM) == before and len(calls) == 3  # handler restored


def test_train_tiny_falls_back_or_refuses_where_fla_backward_is_miscompiled(monkeypatch, caplog):
    import retnet_forgetting.train as train

    monkeypatch.setattr(train, "fla_backward_hazard_on", lambda device: "Triton 3.6.0 miscompiles it")
    with pytest.raises(ValueError, match="implementation='fla': Triton 3.6.0"):
        train._trainable_implementation({"implementation": "fla", "device": "cuda"})
    with caplog.at_level("WARNING"):
        assert train._trainable_implementation({"implementation": "auto", "device": "cuda"}) == "reference"
    assert "training the reference model" in caplog.text
    assert train._trainable_implementation({"implementation": "reference", "device": "cuda"}) == "reference"
    monkeypatch.setattr(train, "fla_backward_hazard_on", lambda device: None)
    assert train._trainable_implementation({"implementation": "fla", "device": "cuda"}) == "fla"
