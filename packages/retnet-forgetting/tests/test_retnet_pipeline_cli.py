from __future__ import annotations

import pandas as pd
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
    probes = {"ridge_head", "ridge_layer", "logistic_head", "logistic_layer", "readout_head"}
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
