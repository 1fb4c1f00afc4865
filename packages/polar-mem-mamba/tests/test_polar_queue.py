"""Queue workers of the sweep: exclusive claims, lockstep training (== the shared Trainer), resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from polar_mem_mamba import Config
from polar_mem_mamba.claims import Claim
from polar_mem_mamba.lockstep import group_key, train_lockstep
from polar_mem_mamba.sweep import best_lr_markdown, load_sweep, run_queue, run_workers
from polar_mem_mamba.train import train

TINY = dict(d_model=32, d_state=8, headdim=16, n_heads=2, encoder_layers=1, decoder_layers=1,
            cross_attn_layers=[0], mem_pool_size=4, mem_summary_dim=16, mem_update_freq=1, chunk_size=16,
            num_pairs=4, num_queries=3, vocab_size=64, batch_size=8, max_steps=3, warmup_steps=1,
            eval_every=0, eval_examples=16, eval_batch_size=8, log_every=1, save_every=0, progress=False,
            label_smoothing=0.0)


def _sweep(tmp_path, **base):
    sweep = {"out_dir": str(tmp_path / "cliff"), "base": {**TINY, **base},
             "sweep": [{"num_pairs": [3, 4], "d_state": [4, 8], "architecture": ["mamba2"],
                        "learning_rate": [1e-3]},
                       {"num_pairs": [3, 4], "d_state": [8], "architecture": ["attention"],
                        "learning_rate": [1e-3]}]}
    path = tmp_path / "cliff.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _metric_lines(config: Config) -> list[dict]:
    return [json.loads(x) for x in (config.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_claim_is_exclusive_until_released(tmp_path):
    config = Config(**TINY, out_dir=str(tmp_path), run_name="run")
    first = Claim.take(config)
    assert first is not None and Claim.take(config) is None
    first.release()
    second = Claim.take(config)
    assert second is not None
    second.release()
    (config.run_dir / "results.json").write_text("{}")
    assert Claim.take(config) is None, "a finished run must never be claimed"


def test_a_claim_dies_with_its_process(tmp_path):
    config = Config(**TINY, out_dir=str(tmp_path), run_name="run")
    config.run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(config.run_dir / ".claim")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Claim.take(config) is None
    finally:
        holder.kill()
        holder.wait()
    claim = Claim.take(config)
    assert claim is not None, "an interrupted worker's run must be claimable again"
    claim.release()


def test_lockstep_on_cpu_equals_the_shared_trainer(tmp_path):
    configs = [Config(**TINY, architecture=arch, learning_rate=lr, out_dir=str(tmp_path / "lockstep"),
                      run_name=arch) for arch, lr in (("polar_pool", 1e-2), ("attention", 3e-3))]
    assert len({group_key(c) for c in configs}) == 1
    trained = train_lockstep(configs)
    for config, (model, metrics) in zip(configs, trained):
        reference, _ = train(config.replace(out_dir=str(tmp_path / "trainer")))
        for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
            torch.testing.assert_close(b, a)
        assert metrics["step"] == 3 and not metrics["cuda_graph"] and 0 <= metrics["eval_accuracy"] <= 1
        ckpt = torch.load(config.run_dir / "checkpoint.pt", weights_only=False)
        assert ckpt["step"] == 3 and ckpt["scheduler"]["last_epoch"] == 3
    with pytest.raises(ValueError, match="runs must share num_pairs"):
        train_lockstep([configs[0], configs[1].replace(num_pairs=3)])


def test_queue_worker_trains_every_run_once_and_resumes(tmp_path):
    path = _sweep(tmp_path)
    _, every = load_sweep(path)
    assert len(every) == 6 and {c.d_state for c in every if c.architecture == "attention"} == {8}
    only = ["num_pairs=4"]
    _, configs = load_sweep(path, only=only)
    done = run_queue(path, only=only, group_size=2)
    assert sorted(done) == sorted(c.run_name for c in configs) and len(done) == 3
    for config in configs:
        assert [r["step"] for r in _metric_lines(config)] == [1, 2, 3]
        assert json.loads((config.run_dir / "results.json").read_text())["step"] == 3
    assert run_queue(path, only=only) == [], "a finished sweep has nothing to train"
    (configs[1].run_dir / "results.json").unlink()
    assert run_queue(path, only=only) == [configs[1].run_name]




@pytest.mark.parametrize("group_size, held, expected", [
    (1, False, [[0], [1], [2]]), (2, False, [[0, 2], [1]]), (1, True, [[1], [2]]), (2, True, [[1], [2]])])
def test_the_queue_follows_the_sweep_files_order(tmp_path, monkeypatch, group_size, held, expected):
    """Grids are trained in the order listed, also while another worker holds the first run (a sweep cut
    short has the first grid everywhere); a group is filled with later runs of its first run's key."""
    import polar_mem_mamba.lockstep as lockstep

    trained, real = [], lockstep.train_lockstep
    monkeypatch.setattr(lockstep, "train_lockstep",
                        lambda configs, graphs=True: trained.append([c.run_name for c in configs])
                        or real(configs, graphs=graphs))
    grid = {"d_state": [8], "architecture": ["mamba2"]}
    sweep = {"out_dir": str(tmp_path / "order"), "base": {**TINY, "max_steps": 1, "warmup_steps": 0},
             "sweep": [{**grid, "num_pairs": [3, 4], "learning_rate": [1e-3]},
                       {**grid, "num_pairs": [3], "learning_rate": [3e-3]}]}
    path = tmp_path / "order.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    _, configs = load_sweep(path)
    assert [(c.num_pairs, c.learning_rate) for c in configs] == [(3, 1e-3), (4, 1e-3), (3, 3e-3)]
    other_worker = Claim.take(configs[0]) if held else None
    run_queue(path, group_size=group_size)
    if other_worker is not None:
        other_worker.release()
    assert trained == [[configs[i].run_name for i in group] for group in expected]


def test_a_worker_stops_at_a_cuda_fault_and_leaves_its_runs_queued(tmp_path, monkeypatch):
    """A sticky CUDA error poisons the process: the worker stops instead of failing every later group."""
    import polar_mem_mamba.lockstep as lockstep

    calls = []

    def broken(configs, graphs=True):
        calls.append([c.run_name for c in configs])
        raise RuntimeError("CUDA error: an illegal instruction was encountered")

    monkeypatch.setattr(lockstep, "train_lockstep", broken)
    path = _sweep(tmp_path)
    assert run_queue(path, only=["num_pairs=4"], group_size=1) == []
    assert len(calls) == 1, "the worker went on with a dead CUDA context"
    _, configs = load_sweep(path, only=["num_pairs=4"])
    assert all(Claim.take(c) is not None for c in configs), "its claims were not released"


def test_two_worker_processes_share_a_sweep_without_training_a_run_twice(tmp_path):
    path = _sweep(tmp_path, max_steps=1, warmup_steps=0)
    csv_path = run_workers(path, workers=2, group_size=1, only=["num_pairs=4"])
    _, configs = load_sweep(path, only=["num_pairs=4"])
    assert len(csv_path.read_text().splitlines()) == 1 + len(configs)
    for config in configs:
        assert len(_metric_lines(config)) == 1, config.run_name
    table = (csv_path.parent / "best_lr.md").read_text().splitlines()
    assert table[0].startswith("| architecture | num_pairs | d_state 4 | d_state 8 |")
    assert any(line.startswith("| attention | 4 |  | ") for line in table)


def test_best_lr_markdown_picks_the_listed_cells():
    text = best_lr_markdown({("mamba2", 8, 4): (0.5, 1e-3), ("mamba2", 8, 16): (0.25, 3e-3),
                             ("attention", 8, 16): (1.0, 1e-3)})
    lines = text.splitlines()
    assert lines[2] == "| mamba2 | 8 | 0.500 (0.001) | 0.250 (0.003) |"
    assert lines[3] == "| attention | 8 |  | 1.000 (0.001) |"
