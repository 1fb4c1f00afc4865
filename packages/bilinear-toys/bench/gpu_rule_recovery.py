"""Train toy models (and softmax reference transformers) on the synthetic language in parallel processes
on one GPU, each for a fixed wall-clock budget, then measure per mechanism the loss against the
generator's floor and the achievable (Bayes) loss, and score how well the weight-based analysis (no
forward pass on data) recovers the planted rules. Prints JSON and writes it to ``--out``.

A *plan* (JSON) lists the jobs: ``{"defaults": {...}, "jobs": [{"name", "model_type" | "softmax_2L" |
"softmax_1L", "seed", "d_model", "n_head", "lr", "batch_size", "time_s", ...}]}``. Protocol: thresholds
are calibrated on the model of the *calibration* language (``calibration_seed``, other rule tokens) of
the same ``group`` and applied unchanged to the model of the evaluation language
(:func:`bilinear_toys.recovery.calibrate_thresholds`, :func:`~bilinear_toys.recovery.apply_thresholds`).
The learning rate follows a wall-clock schedule (linear warmup over 3% of ``time_s``, cosine to 10%), so
every job ends on time whatever the GPU sharing.

    python packages/bilinear-toys/bench/gpu_rule_recovery.py --plan bench/plans/production.json --out DIR
    python packages/bilinear-toys/bench/gpu_rule_recovery.py --smoke      # tiny CPU run
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch

DEFAULTS: dict[str, Any] = {"vocab_size": 128, "n_ctx": 64, "d_model": 128, "n_head": 4, "lr": 1e-2,
                            "batch_size": 128, "time_s": 60.0, "init": "unit", "seed": 0, "threads": 1,
                            "pool": 400_000, "val_sequences": 2048, "max_offset": 16, "evals": 8,
                            "warmup_frac": 0.03, "min_lr_ratio": 0.1, "qk_init_scale": 1.0,
                            "norm": None, "qk_norm": False}


class WallClock:
    """LR factor and stopping by elapsed wall-clock time (warmup, then cosine to ``min_ratio``); also
    evaluates ``eval_fn`` at ``evals`` evenly spaced times (the loss curve used to judge a plateau)."""

    def __init__(self, budget_s: float, warmup_frac: float, min_ratio: float, eval_fn, evals: int) -> None:
        self.budget, self.warmup, self.min_ratio = budget_s, warmup_frac, min_ratio
        self.eval_fn, self.evals, self.t0, self.curve = eval_fn, evals, None, []

    def frac(self) -> float:
        return 0.0 if self.t0 is None else min((time.perf_counter() - self.t0) / self.budget, 1.0)

    def factor(self, _step: int) -> float:
        f = self.frac()
        if f < self.warmup:
            return max(f / self.warmup, 1e-3)
        cos = 0.5 * (1 + math.cos(math.pi * (f - self.warmup) / (1 - self.warmup)))
        return self.min_ratio + (1 - self.min_ratio) * cos

    def on_fit_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        f = self.frac()
        if f >= (len(self.curve) + 1) / self.evals or f >= 1.0:
            model = trainer.raw_model
            model.eval()
            with torch.no_grad():
                self.curve.append({"step": step, "time_frac": round(f, 3), "val_loss": self.eval_fn(model)})
            model.train()
        if f >= 1.0:
            trainer.should_stop = True

    def on_eval_end(self, *args) -> None: ...

    def on_save(self, *args) -> None: ...


def validation_set(lang, sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, rule, floor nll) ``[sequences, seq_len]``: the evaluation sequences of language ``lang``,
    drawn from another stream than its training pool (``lang.seed + 20000``)."""
    return lang.generate(sequences, seed=lang.seed + 20_000, return_nll=True)


def build_model(job: dict) -> torch.nn.Module:
    """The job's model. ``qk_init_scale`` multiplies a toy model's initial ``W_Q`` and ``W_K`` (the pattern
    starts at its 4th power): a smaller start keeps deeper polynomial models from blowing up early.
    ``norm``/``qk_norm`` (``ModelConfig``'s) give a non-polynomial toy model: trained and scored on the
    data like the softmax references, without the weight-based analysis."""
    from bilinear_toys.models import ModelConfig, ToyTransformer
    from bilinear_toys.models.reference import SoftmaxTransformer

    kind = job["model_type"]
    if kind.startswith("softmax_"):
        n_layers = int(kind.removeprefix("softmax_").removesuffix("L"))
        return SoftmaxTransformer(job["vocab_size"], job["d_model"], job["n_head"], n_layers, job["n_ctx"],
                                  mlp=job.get("mlp", True))
    model = ToyTransformer(ModelConfig(kind, vocab_size=job["vocab_size"], d_model=job["d_model"],
                                       n_head=job["n_head"], n_ctx=job["n_ctx"], init=job["init"],
                                       norm=job["norm"], qk_norm=job["qk_norm"], attention_impl="quadratic"))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q.weight.mul_(job["qk_init_scale"])
            block.attn.k.weight.mul_(job["qk_init_scale"])
    return model


def run_job(job: dict) -> dict:
    """Train one job for ``time_s`` seconds; return its losses (vs floor and achievable) and, for toy
    models, the rule recovery at the default thresholds (with the scores needed to re-threshold)."""
    from bilinear_toys.checkpoint import save_model
    from bilinear_toys.data import SyntheticLanguage
    from bilinear_toys.data.bayes import bayes_nll
    from bilinear_toys.recovery import fit_summary, rule_losses, rule_recovery
    from bilinear_toys.train import lm_loss
    from seqmem_shared.optim import build_optimizer
    from seqmem_shared.train import TrainConfig, Trainer, seed_everything

    torch.set_num_threads(job["threads"])
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(job["seed"])
    lang = SyntheticLanguage(vocab_size=job["vocab_size"], seq_len=job["n_ctx"] + 1, seed=job["seed"])
    pool, _ = lang.sample(job["pool"], seed=job.get("data_seed", 0))
    pool = pool.to(torch.uint8 if job["vocab_size"] <= 256 else torch.int32)
    bs = job["batch_size"]
    ones = torch.ones(bs, job["n_ctx"] + 1, dtype=torch.long)

    def get_batch(index: int) -> dict[str, torch.Tensor]:
        rows = (torch.arange(bs) + index * bs) % len(pool)
        return {"input_ids": pool[rows].long(), "attention_mask": ones}

    val_small, _ = lang.sample(8 * 256, seed=10_000)
    val_small = val_small.to(device)

    def val_loss(model: torch.nn.Module) -> float:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return float(sum(lm_loss(model, {"input_ids": b, "attention_mask": torch.ones_like(b)})[0]
                             for b in val_small.split(256)) / 8)

    model = build_model(job).to(device)
    opt = build_optimizer(model, "muon", lr=job["lr"], weight_decay=0.0)
    clock = WallClock(job["time_s"], job["warmup_frac"], job["min_lr_ratio"], val_loss, job["evals"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, clock.factor)  # bound method: state not pickled
    out = Path(job["out"]) / job["name"]
    tc = TrainConfig(max_steps=10**8, lr=job["lr"], optimizer="muon", weight_decay=0.0, out_dir=str(out),
                     seed=job["seed"], progress=False, resume=False, log_every=100)
    t_setup = time.time() - t0
    try:
        Trainer(model, tc, lm_loss, get_batch, optimizer=opt, scheduler=sched, callbacks=[clock]).fit()
    except FloatingPointError as exc:
        raise ValueError(f"{job['name']}: {exc}; {last_finite(clock.curve)}") from None
    t_train = time.time() - t0 - t_setup
    model = model.float().eval()
    tokens, rule, nll = validation_set(lang, job["val_sequences"])
    losses = rule_losses(model, tokens, rule, nll, skip_trigrams=lang.rules.skip_trigrams,
                         achievable=bayes_nll(lang, tokens))
    res = {"job": job, "steps": clock.curve[-1]["step"] if clock.curve else 0, "curve": clock.curve,
           "setup_s": round(t_setup, 1), "train_s": round(t_train, 1), "losses": losses,
           **fit_summary(losses, job.get("fit_margin", 0.1)), "plateau": plateau(clock.curve)}
    if getattr(model, "config", None) is not None:  # a toy model (saved); polynomial: the weight analysis
        save_model(model, out, "synthetic", {"steps": res["steps"]})
        if model.config.is_polynomial:
            res["recovery"] = rule_recovery(model, lang.rules.to_dict(), max_offset=job["max_offset"])
    res["analysis_s"] = round(time.time() - t0 - t_setup - t_train, 1)
    from seqmem_shared.io import atomic_write_json

    atomic_write_json(out / "result.json", res)  # survives a run cut short
    print(json.dumps({"name": job["name"], "steps": res["steps"], "val": losses["all"],
                      "gap_to_achievable": res.get("gap_to_achievable")}), flush=True)
    return res


def last_finite(curve: list[dict]) -> str:
    """Where a diverged job's loss curve (:class:`WallClock`'s) was last finite, in words."""
    last = next((c for c in reversed(curve) if math.isfinite(c["val_loss"])), None)
    if last is None:
        return "no finite val loss"
    return (f"last finite val loss {last['val_loss']:.3f} at step {last['step']} "
            f"({last['time_frac']:.0%} of the time)")


def run_job_or_error(job: dict) -> dict:
    """:func:`run_job`, or ``{"job", "error"}`` (also written to ``<out>/<name>/error.json``) when it raises:
    one failed job keeps the others' results."""
    from seqmem_shared.io import atomic_write_json

    try:
        return run_job(job)
    except Exception as exc:  # noqa: BLE001 - reported in the plan's output, the other jobs go on
        res = {"job": job, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"name": job["name"], "error": res["error"][:500]}), flush=True)
        atomic_write_json(Path(job["out"]) / job["name"] / "error.json", res)
        return res


RESULT_FILES = ("result.json", "error.json")


def run_isolated(jobs: list[dict]) -> list[dict]:
    """All jobs at once, one spawned process each (they share the GPU). Results are read back from
    ``<out>/<name>/result.json`` (or ``error.json``), so a job whose process dies without raising (a native
    abort in LAPACK, the OOM killer) loses only its own result; a pool would have killed its siblings.
    Files older than this call (an earlier run's) are kept on disk but not taken as this run's result."""
    started = time.time()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_job_or_error, args=(job,), name=job["name"]) for job in jobs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return [_read_result(job, proc.exitcode, started) for job, proc in zip(jobs, procs)]


def _read_result(job: dict, exitcode: int | None, since: float) -> dict:
    for name in RESULT_FILES:
        path = Path(job["out"]) / job["name"] / name
        if path.exists() and path.stat().st_mtime >= since:
            return json.loads(path.read_text())
    return {"job": job, "error": f"process exited with code {exitcode} before writing a result (see stderr)"}


def plateau(curve: list[dict], window: float = 0.3, tol: float = 0.02) -> dict[str, Any]:
    """Whether the validation loss improved by less than ``tol`` nats over the last ``window`` of the
    training time (the curve of :class:`WallClock`)."""
    if len(curve) < 2:
        return {"plateaued": False, "improvement": None}
    end = curve[-1]
    ref = min(curve, key=lambda c: abs(c["time_frac"] - (end["time_frac"] - window)))
    gain = ref["val_loss"] - end["val_loss"]
    return {"plateaued": gain < tol, "improvement": round(gain, 4), "window": window, "tol": tol}


def summarize(results: list[dict], calibration_seed: int) -> dict[str, Any]:
    """Per group: thresholds calibrated on the calibration-language model, applied to the others."""
    from bilinear_toys.recovery import apply_thresholds, calibrate_thresholds

    groups: dict[str, Any] = {}
    for r in results:
        if "recovery" in r:
            groups.setdefault(r["job"].get("group", r["job"]["name"]), []).append(r)
    for members in groups.values():
        calib = next((r for r in members if r["job"]["seed"] == calibration_seed), None)
        if calib is None:
            continue
        thr = calibrate_thresholds(calib["recovery"])
        for r in members:
            r["recovery_calibrated"] = apply_thresholds(r["recovery"], thr)
    return {"groups": {g: [r["job"]["name"] for r in m] for g, m in groups.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", help="JSON plan (see the module docstring)")
    p.add_argument("--out", default="runs/rule_recovery")
    p.add_argument("--calibration_seed", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run")
    args = p.parse_args()
    if args.smoke:
        plan = {"defaults": {"vocab_size": 64, "n_ctx": 32, "d_model": 16, "n_head": 2, "batch_size": 4,
                             "time_s": 2.0, "pool": 256, "val_sequences": 16, "evals": 2},
                "jobs": [{"name": "a2_calib", "group": "a2", "model_type": "attention_only_2L", "seed": 1},
                         {"name": "a2_eval", "group": "a2", "model_type": "attention_only_2L", "seed": 0},
                         {"name": "ref", "model_type": "softmax_1L", "seed": 0}]}
    else:
        plan = json.loads(Path(args.plan).read_text())
    jobs = [{**DEFAULTS, **plan.get("defaults", {}), **j, "out": args.out} for j in plan["jobs"]]
    t0 = time.time()
    if len(jobs) > 1 and not args.smoke:
        results = run_isolated(jobs)
    else:
        results = [run_job_or_error(j) for j in jobs]
    from seqmem_shared.io import atomic_write_json

    summary = summarize(results, args.calibration_seed)
    out = {"plan": plan, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "wall_s": round(time.time() - t0, 1), **summary, "results": results}
    atomic_write_json(Path(args.out) / "rule_recovery.json", out)
    print(json.dumps({"wall_s": out["wall_s"], "device": out["device"]}))


if __name__ == "__main__":
    main()
