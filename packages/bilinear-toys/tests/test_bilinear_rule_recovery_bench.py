"""``bench/gpu_rule_recovery.py`` runs its jobs in separate processes: a failing job loses only its own
result (on an H100, 2026-12-07, one job's process died and a process pool took the others with it)."""

import json
import os
import time
from pathlib import Path

import torch


def test_isolated_jobs_keep_the_others_results(tmp_path, bench):
    g = bench("gpu_rule_recovery")  # spawned children import the script by its path, which they inherit

    tiny = {**g.DEFAULTS, "vocab_size": 64, "n_ctx": 16, "d_model": 16, "n_head": 2, "batch_size": 4,
            "time_s": 1.0, "pool": 64, "val_sequences": 8, "evals": 2, "max_offset": 4, "out": str(tmp_path)}
    old = tmp_path / "bad" / "result.json"  # an earlier run's result: kept, but not this run's
    old.parent.mkdir()
    old.write_text(json.dumps({"old": True}))
    os.utime(old, (0, 0))
    jobs = [{**tiny, "name": "ok", "model_type": "attention_only_1L"},
            {**tiny, "name": "bad", "model_type": "no_such_model"},
            {**tiny, "name": "normed", "model_type": "attention_only_1L", "norm": "rms"}]
    ok, bad, normed = g.run_isolated(jobs)
    assert ok["job"]["name"] == "ok" and "recovery" in ok and ok["steps"] > 0
    # a model with norms trains and is scored on the data, but the weight analysis needs a polynomial one
    assert "recovery" not in normed and normed["losses"]["all"]["loss"] > 0 and normed["steps"] > 0
    assert (tmp_path / "normed" / "toy_transformer_synthetic_attention_only_1L.safetensors").is_file()
    assert bad["job"]["name"] == "bad" and "no_such_model" in bad["error"]
    assert json.loads((tmp_path / "bad" / "error.json").read_text())["error"] == bad["error"]
    assert json.loads(old.read_text()) == {"old": True}
    gone = g._read_result({**tiny, "name": "bad"}, -9, since=time.time() + 60)  # nothing newer on disk
    assert gone["error"].startswith("process exited with code -9")


def test_shipped_plans_name_known_fields_and_buildable_models(bench):
    g = bench("gpu_rule_recovery")

    known = set(g.DEFAULTS) | {"name", "model_type", "group", "data_seed", "fit_margin", "mlp"}
    tokens = torch.randint(0, 16, (1, 8), generator=torch.Generator().manual_seed(0))
    plans = sorted((Path(g.__file__).parent / "plans").glob("*.json"))
    assert plans
    for path in plans:
        plan = json.loads(path.read_text())
        jobs = [{**g.DEFAULTS, **plan.get("defaults", {}), **job} for job in plan["jobs"]]
        assert len({job["name"] for job in jobs}) == len(jobs), path.name
        for job in jobs:
            assert set(job) <= known, (path.name, set(job) - known)
            # the job's architecture at a tiny width (same heads, so divisibility is checked too)
            model = g.build_model({**job, "d_model": 8 * job["n_head"], "vocab_size": 16, "n_ctx": 8})
            assert model(tokens).shape == (1, 8, 16), (path.name, job["name"])


def test_a_diverged_job_says_where_its_loss_was_last_finite(tmp_path, bench):
    g = bench("gpu_rule_recovery")

    curve = [{"step": 100, "time_frac": 0.25, "val_loss": 3.5},
             {"step": 210, "time_frac": 0.5, "val_loss": 3.25},
             {"step": 300, "time_frac": 0.75, "val_loss": float("nan")}]
    assert g.last_finite(curve) == "last finite val loss 3.250 at step 210 (50% of the time)"
    assert g.last_finite(curve[2:]) == "no finite val loss"
    job = {**g.DEFAULTS, "vocab_size": 64, "n_ctx": 16, "d_model": 32, "n_head": 2, "batch_size": 8,
           "time_s": 1.0, "pool": 256, "val_sequences": 8, "evals": 2, "out": str(tmp_path),
           "name": "t3", "model_type": "transformer_3L", "lr": 100.0}
    res = g.run_job_or_error(job)
    want = "ValueError: t3: Trainer: the loss is not finite since step "
    assert res["error"].startswith(want), res["error"]
    assert res["error"].endswith(("no finite val loss", "of the time)")), res["error"]


def test_qk_init_scale_shrinks_only_the_initial_queries_and_keys(bench):
    g = bench("gpu_rule_recovery")
    job = {**g.DEFAULTS, "model_type": "transformer_2L", "vocab_size": 64, "d_model": 16, "n_head": 2}
    torch.manual_seed(0)
    ref = g.build_model(job)
    torch.manual_seed(0)
    small = g.build_model({**job, "qk_init_scale": 0.5})
    torch.testing.assert_close(small.W_Q, 0.5 * ref.W_Q)
    torch.testing.assert_close(small.W_K, 0.5 * ref.W_K)
    torch.testing.assert_close(small.W_V, ref.W_V)
    torch.testing.assert_close(small.W_L, ref.W_L)
