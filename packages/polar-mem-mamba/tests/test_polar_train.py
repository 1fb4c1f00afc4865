"""Training, evaluation, CLI and sweep mechanics on tiny CPU configs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from polar_mem_mamba import Config
from polar_mem_mamba.cli import eval_main, train_main
from polar_mem_mamba.config import ConfigError
from polar_mem_mamba.data import MQARBatches, heldout_set
from polar_mem_mamba.lockstep import train_lockstep
from polar_mem_mamba.sweep import load_sweep, run_sweep
from polar_mem_mamba.train import (
    answer_accuracy,
    build_model,
    evaluate,
    initial_model,
    mqar_loss,
    train_config,
)

TINY = dict(d_model=32, d_state=8, headdim=16, n_heads=2, encoder_layers=2, decoder_layers=2,
            cross_attn_layers=[0], mem_pool_size=4, mem_summary_dim=16, mem_update_freq=2, chunk_size=16,
            num_pairs=4, num_queries=3, vocab_size=64, batch_size=8, max_steps=3, warmup_steps=1,
            eval_every=0, eval_examples=16, eval_batch_size=8, log_every=1, save_every=0, progress=False,
            label_smoothing=0.0)


def _write(tmp_path, name="tiny", **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "out"), **changes}))
    return path


def test_answer_accuracy_counts_answer_positions_per_slot():
    targets = torch.tensor([[-100, 5, 6], [-100, 7, 8]])
    logits = torch.zeros(2, 3, 10)
    logits[0, 1, 5] = logits[0, 2, 1] = logits[1, 1, 7] = logits[1, 2, 8] = 1.0
    overall, per_slot = answer_accuracy(logits, targets)
    assert overall.item() == pytest.approx(0.75)
    assert per_slot.tolist() == pytest.approx([1.0, 0.5])


def test_batches_are_reproducible_and_disjoint_from_the_test_set():
    config = Config(**TINY)
    batches = MQARBatches(config, 8)
    assert torch.equal(batches(5)["encoder_ids"], batches(5)["encoder_ids"])
    assert not torch.equal(batches(5)["encoder_ids"], batches(6)["encoder_ids"])
    test, val = heldout_set(config, "test"), heldout_set(config, "validation")
    assert test["encoder_ids"].shape == (16, 2 * 4 + 2) and test["targets"].shape == (16, 4)
    assert not torch.equal(test["encoder_ids"], val["encoder_ids"])
    with pytest.raises(ValueError, match="split: expected one of"):
        heldout_set(config, "train")


def test_train_min_pairs_mixes_pair_counts_in_training_only():
    config = Config(**{**TINY, "num_pairs": 6, "train_min_pairs": 3, "batch_size": 64})
    enc = MQARBatches(config, 64)(0)["encoder_ids"]
    counts = (enc[:, 1:] >= 10).sum(1) // 2
    assert enc.shape == (64, 14) and counts.min() == 3 and counts.max() == 6
    test = heldout_set(config, "test")["encoder_ids"]
    assert ((test[:, 1:-1] >= 10).sum(1) == 12).all()  # evaluation: num_pairs pairs in every example
    assert torch.equal(test, heldout_set(Config(**{**TINY, "num_pairs": 6}), "test")["encoder_ids"])
    assert Config(**{**TINY, "num_pairs": 6, "train_min_pairs": 6}).train_min_pairs is None  # no mixture


def test_loss_and_evaluate_on_an_untrained_model():
    config = Config(**TINY)
    model = build_model(config)
    loss, metrics = mqar_loss(config)(model, MQARBatches(config, 8)(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and 0.0 <= metrics["accuracy"].item() <= 1.0
    result = evaluate(model, config)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["per_slot_accuracy"]) == 3
    assert result["num_examples"] == 16


def test_time_limit_s_reaches_the_train_config():
    assert train_config(Config(**TINY)).time_limit_s is None
    assert train_config(Config(**TINY, time_limit_s="90")).time_limit_s == 90.0  # YAML-style string too


def test_align_eval_trains_first_then_reuses_the_checkpoint(tmp_path, capsys):
    path = _write(tmp_path)
    eval_main(["--config", str(path)])
    out = capsys.readouterr().out
    run = tmp_path / "out" / "tiny"
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 1.0 and len(results["per_slot_accuracy"]) == 3
    assert results["step"] == 3 and results["config"]["num_pairs"] == 4
    assert "overall" in out and "results:" in out
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
    mtime = (run / "checkpoint.pt").stat().st_mtime_ns
    eval_main(["--config", str(path), "--set", "eval_examples=8"])
    assert (run / "checkpoint.pt").stat().st_mtime_ns == mtime, "an existing checkpoint must not be retrained"
    assert json.loads((run / "results.json").read_text())["num_examples"] == 8


def test_init_from_starts_a_curriculum_stage_from_another_runs_weights(tmp_path):
    train_main(["--config", str(_write(tmp_path, name="stage1"))])
    stage1 = tmp_path / "out" / "stage1" / "checkpoint.pt"
    trained = torch.load(stage1, weights_only=True)["model"]
    stage2 = Config(**{**TINY, "num_pairs": 6, "seed": 5}, init_from=str(stage1))
    model = initial_model(stage2)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    fresh = build_model(stage2)
    assert not all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    # the lockstep sweep trainer starts from the same weights (one AdamW step of 1e-12 moves them ~1e-12)
    once = {**TINY, "max_steps": 1, "warmup_steps": 0, "learning_rate": 1e-12}
    [(lock, _)] = train_lockstep([Config(**once, init_from=str(stage1), out_dir=str(tmp_path / "lock"))])
    assert all(torch.allclose(v, trained[k], rtol=0, atol=1e-9) for k, v in lock.state_dict().items())
    with pytest.raises(ConfigError, match=r"^Config.init_from: checkpoint file not found: .*nowhere.pt$"):
        initial_model(Config(**TINY, init_from=str(tmp_path / "nowhere.pt")))
    with pytest.raises(ConfigError, match=r"^Config.init_from: .*stage1.*checkpoint.pt"):
        initial_model(Config(**{**TINY, "d_state": 4}, init_from=str(stage1)))


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = _write(tmp_path, d_stat=3)
    with pytest.raises(SystemExit) as info:
        train_main(["--config", str(path)])
    assert info.value.code == 2
    assert "unknown field 'd_stat' (did you mean 'd_state'?)" in capsys.readouterr().err
    good = _write(tmp_path, name="good")
    with pytest.raises(SystemExit):
        eval_main(["--config", str(good), "--checkpoint", str(tmp_path / "missing.pt")])
    assert "--checkpoint: checkpoint file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--config", str(good), "--set", "d_state"])
    assert "--set 'd_state': expected key=value" in capsys.readouterr().err


def test_sweep_trains_missing_runs_and_writes_reports(tmp_path):
    sweep = {"out_dir": str(tmp_path / "cliff"), "base": {**TINY, "max_steps": 1, "warmup_steps": 0},
             "sweep": {"architecture": ["mamba2", "attention"], "num_pairs": [3, 4], "d_state": [4, 8],
                       "learning_rate": [1e-3]}}
    path = tmp_path / "cliff.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    out_dir, configs = load_sweep(path, only=["num_pairs=4"])
    assert len(configs) == 4 and {c.num_pairs for c in configs} == {4}
    assert configs[0].run_name == "mamba2-N4-d4-lr0.001"
    csv_path = run_sweep(path, only=["num_pairs=4"])
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("run,architecture,num_pairs,d_state") and len(lines) == 5
    for name in ("heatmap_mamba2.png", "heatmap_attention.png", "cliff.png"):
        assert (out_dir / name).stat().st_size > 0
    # a finished run trained under other base settings is not silently reused
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**sweep, "base": {**sweep["base"], "max_steps": 2, "log_every": 5}},
                                     sort_keys=False))
    with pytest.raises(ValueError, match=r"mamba2-N4-d4-lr0.001/results.json: trained with max_steps=1, but "
                                         r"the sweep now sets 2; use another out_dir"):
        load_sweep(edited, only=["num_pairs=4"])
    relogged = tmp_path / "relogged.yaml"  # bookkeeping fields may change
    relogged.write_text(yaml.safe_dump({**sweep, "base": {**sweep["base"], "log_every": 5}}, sort_keys=False))
    assert len(load_sweep(relogged, only=["num_pairs=4"])[1]) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**sweep, "sweep": {"d_stat": [1]}}))
    with pytest.raises(ValueError, match="sweep: unknown Config field 'd_stat'"):
        load_sweep(bad)


def test_a_tiny_model_learns_easy_mqar(tmp_path):
    """Two pairs, two queries, a 32-token vocabulary: chance is 0.5; the shared Trainer must reach > 0.9."""
    from polar_mem_mamba.train import train

    config = Config(architecture="attention", d_model=32, n_heads=2, encoder_layers=1, decoder_layers=1,
                    num_pairs=2, num_queries=2, vocab_size=32, batch_size=32, learning_rate=3e-3,
                    label_smoothing=0.0, max_steps=400, warmup_steps=10, min_lr_ratio=1.0, eval_every=0,
                    eval_examples=256, log_every=50, save_every=0, progress=False, out_dir=str(tmp_path),
                    run_name="learn")
    model, metrics = train(config)
    result = evaluate(model, config)
    assert result["accuracy"] > 0.9, result
    assert metrics["eval_accuracy"] > 0.9
