"""``torchrun --nproc_per_node=2 -m retnet_forgetting.cli run`` on CPU (gloo) equals one process; resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from retnet_forgetting.cli import main
from retnet_forgetting.distributed import any_rank, gather_frames, my_jobs
from retnet_forgetting.store import StateStore


def _config(out):
    return {
        "out_dir": str(out), "tokenizer": "bytes",
        "model": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 259},
                  "dtype": "float32", "implementation": "reference", "device": "cpu"},
        "dataset": {"num_sequences": 60, "lags": [24, 200], "filler": "random", "num_names": 30},
        "extraction": {"batch_size": 16, "shard_rows": 20, "dtype": "float32",
                       "reduction": {"kind": "bilinear", "rank_k": 4, "rank_v": 4}},
        "probes": {"kinds": ["ridge", "logistic"], "groups": ["head", "layer"],
                   "logistic": {"max_steps": 40, "patience": 5}},
    }


def _torchrun(config_path, nproc: int = 2) -> str:
    """``torchrun --standalone --nproc_per_node=nproc -m retnet_forgetting.cli run --config ...``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "retnet_forgetting.cli", "run", "--config", str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_torchrun_two_cpu_ranks_equal_one_process_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(_config(out)))
    stdout = _torchrun(tmp_path / "two.yaml")
    # one process on the same dataset (the generator's name order depends on the process's hash seed)
    one.mkdir()
    shutil.copy(two / "dataset.parquet", one / "dataset.parquet")
    assert main(["run", "--config", str(tmp_path / "one.yaml")]) == 0
    assert stdout.count("report.md") == 1  # only rank 0 reports

    curves_one, curves_two = pd.read_csv(one / "curves.csv"), pd.read_csv(two / "curves.csv")
    pd.testing.assert_frame_equal(curves_two, curves_one)
    assert set(curves_one["probe"]) == {"ridge_head", "ridge_layer", "logistic_head", "logistic_layer",
                                        "readout_head", "model_answer"}
    pd.testing.assert_frame_equal(pd.read_csv(two / "half_lives.csv"), pd.read_csv(one / "half_lives.csv"))
    store_one, store_two = StateStore(one / "states"), StateStore(two / "states")
    assert len(store_two.manifest["shards"]) == 3 and not store_two.pending()
    for record in ("fact", "query", "readout"):
        a, b = store_one.load(record), store_two.load(record)
        for layer in a:
            torch.testing.assert_close(b[layer], a[layer], atol=1e-6, rtol=1e-5)

    # resume under 2 ranks (rank 0's share of what is pending): only the missing shard is written again
    from retnet_forgetting.pipeline import build_model, extract, load_config
    from seqmem_shared.tokenization import get_tokenizer

    shard0, shard2 = (two / "states" / f"shard_{i:05d}.safetensors" for i in (0, 2))
    mtime = shard0.stat().st_mtime_ns
    shard2.unlink()
    cfg = load_config(tmp_path / "two.yaml")
    df = pd.read_parquet(two / "dataset.parquet")
    model = build_model(cfg, get_tokenizer("bytes"))
    extract(cfg, model, df, two / "states", rank=1, world_size=2)  # nothing pending for rank 1
    assert not shard2.exists()
    extract(cfg, model, df, two / "states", rank=0, world_size=2)
    assert shard2.exists() and shard0.stat().st_mtime_ns == mtime
    torch.testing.assert_close(StateStore(two / "states").load("query")[1], store_one.load("query")[1],
                               atol=1e-6, rtol=1e-5)


def test_single_process_helpers():
    assert my_jobs(5) == [0, 1, 2, 3, 4]
    assert my_jobs(5, rank=1, world_size=2) == [1, 3]
    assert my_jobs(1, rank=1, world_size=2) == []
    with pytest.raises(ValueError, match="rank=2"):
        my_jobs(4, rank=2, world_size=2)
    assert any_rank(True) is True and any_rank(False) is False
    rows = [{"layer": 0, "head": h, "probe": "p", "lag": lag, "accuracy": 0.5, "n": 1, "_job": h}
            for lag in (20, 10) for h in (1, 0)]
    table = gather_frames([pd.DataFrame(rows)])
    assert list(zip(table["lag"], table["head"])) == [(10, 0), (10, 1), (20, 0), (20, 1)]
    assert "_job" not in table
