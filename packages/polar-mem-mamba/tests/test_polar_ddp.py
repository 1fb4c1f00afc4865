"""``bench/compare_ddp.py`` on CPU: one process vs ``torchrun --nproc_per_node=2`` (gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SCRIPT = Path(__file__).parents[1] / "bench" / "compare_ddp.py"


def test_one_process_vs_two_gloo_ranks_same_global_batch(tmp_path):
    config = dict(architecture="attention", d_model=32, n_heads=2, encoder_layers=1, decoder_layers=1,
                  num_pairs=2, num_queries=2, vocab_size=32, batch_size=16, learning_rate=3e-3,
                  label_smoothing=0.0, max_steps=12, warmup_steps=2, min_lr_ratio=1.0, eval_every=0,
                  eval_examples=64, log_every=1, save_every=0, progress=False, run_name="ddp")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--nproc", "2",
                           "--out-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "out" / "compare_ddp.json").read_text())
    assert (result["global_batch"], result["per_rank_batch"]) == (16, 8)
    one, two = result["runs"]["1"], result["runs"]["2"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["step"] == two["step"] == 12
    assert all(0.0 <= run["test_accuracy"] <= 1.0 for run in (one, two))
    curves = result["loss_curves"]
    assert (curves["common_steps"], curves["first_step"], curves["last_step"]) == (11, 2, 12)
    assert curves["rms_diff"] > 0  # different batches: the runs are not the same run twice
    reseeded = result["runs"]["1_seed1"]
    assert (reseeded["world_size"], reseeded["seed"], reseeded["step"]) == (1, 1, 12)
    assert result["reference_loss_curves"]["rms_diff"] > 0
    assert isinstance(result["within_seed_variation"], bool)
    assert (tmp_path / "out" / "nproc2" / "ddp" / "results.json").is_file()


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(dict(batch_size=15, max_steps=2, warmup_steps=0)))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--nproc", "2",
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Config.batch_size: expected a multiple of --nproc 2, got 15" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(max_steps=2)))  # warmup_steps defaults to more than 2
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Config.warmup_steps: expected an integer <= max_steps=2" in proc.stderr
