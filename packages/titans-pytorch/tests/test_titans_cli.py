"""titans-train on synthetic bytes: seed-layout checkpoints, resume, config files, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from titans_pytorch.cli import TrainMACConfig, train_main
from titans_pytorch.data import RandomCrops, load_byte_splits

TINY = [
    "--dim",
    "16",
    "--depth",
    "2",
    "--neural-mem-layers",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--gradient-accumulate-every",
    "1",
    "--window-size",
    "8",
    "--neural-mem-batch-size",
    "16",
    "--neural-mem-spec-norm-surprises",
    "false",
    "--neural-mem-weight-residual",
    "false",
    "--neural-mem-qkv-receives-diff-view",
    "false",
    "--store-attn-pool-chunks",
    "false",
    "--validate-every",
    "2",
    "--generate-every",
    "2",
    "--prime-length",
    "4",
    "--generate-length",
    "4",
    "--save-every",
    "2",
    "--no-progress",
]


@pytest.fixture
def data_file(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "bytes.txt"
    path.write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "<doc>"]) for _ in range(3000)))
    return path


def test_byte_splits_and_crops(data_file):
    train, val = load_byte_splits(data_file)
    size = data_file.stat().st_size
    assert len(train) == size * 90 // 95 and len(train) + len(val) == size
    crops = RandomCrops(train, seq_len=16, batch_size=3, seed=1)
    a, b = crops(5), crops(5)
    assert a.shape == (3, 17) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(crops(5), crops(6))


def test_train_writes_seed_checkpoints_and_resumes(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data-path", str(data_file), "--out-dir", str(out), *TINY]
    assert train_main([*args, "--num-batches", "2"]) == 0
    best = torch.load(out / "titans_enwik8_best.pt", weights_only=False)
    assert set(best) == {"batch", "model_state_dict", "optimizer_state_dict", "val_loss", "config"}
    assert best["batch"] == 2 and best["val_loss"] > 0 and best["config"]["dim"] == 16
    assert (out / "checkpoint_batch_2.pt").exists() and (out / "titans_enwik8.pt").exists()
    assert "[step 2]" in capsys.readouterr().out  # a sample was generated
    train_main([*args, "--num-batches", "3"])  # resumes at step 2
    final = torch.load(out / "titans_enwik8.pt", weights_only=False)
    assert final["batch"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    model = TrainMACConfig(
        **{**final["config"], "neural_mem_layers": tuple(final["config"]["neural_mem_layers"])}
    )
    model.build_model().load_state_dict(final["model_state_dict"])


def test_config_file_and_bad_input(tmp_path, data_file):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"NUM_BATCHES": 7, "SEQ_LEN": 64}))
    from titans_pytorch.cli import _parser, load_config

    cfg = load_config(_parser().parse_args(["--config", str(cfg_path), "--seq-len", "32"]))
    assert cfg.num_batches == 7 and cfg.seq_len == 32
    cfg_path.write_text(json.dumps({"NUM_BATCHS": 7}))
    with pytest.raises(ValueError, match="NUM_BATCHS"):
        load_config(_parser().parse_args(["--config", str(cfg_path)]))
    with pytest.raises(FileNotFoundError, match="data_path"):
        train_main(["--data-path", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)])


def test_time_limit_flag_stops_training(data_file, tmp_path):
    from titans_pytorch.cli import _parser, load_config

    with pytest.raises(ValueError, match=r"^command line: TrainMACConfig.time_limit_s: expected a positive"):
        load_config(_parser().parse_args(["--time-limit-s", "0"]))
    out = tmp_path / "run"
    train_main(["--data-path", str(data_file), "--out-dir", str(out), *TINY, "--num-batches", "50",
                "--time-limit-s", "1e-9"])  # reached after the first step
    assert torch.load(out / "titans_enwik8.pt", weights_only=False)["batch"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["extra"]["trainer"]["time_limited"]
