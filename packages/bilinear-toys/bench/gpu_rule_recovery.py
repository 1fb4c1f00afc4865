"""Train attention_only_2L and transformer_1L on the synthetic language, then score how well the
weight-based circuit analysis (no forward pass on data) recovers the planted rules. Prints JSON and writes
it to --out (plus checkpoints and a bilinear-analyze report per evaluated model).

Protocol: every model type is trained twice, on a *calibration* language (``--calibration_seed``: other
rule tokens) and on the *evaluation* language (``--seed``). Detection thresholds are chosen on the
calibration model (:func:`bilinear_toys.recovery.calibrate_thresholds`) and applied unchanged to the
evaluation model, so they are never tuned on the answer. Fit is measured per mechanism against the
generator's loss floor (:func:`bilinear_toys.recovery.rule_losses`). The jobs run in parallel processes.

    python packages/bilinear-toys/bench/gpu_rule_recovery.py --out runs/rule_recovery
    python packages/bilinear-toys/bench/gpu_rule_recovery.py --smoke      # tiny CPU run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from bilinear_toys.checkpoint import load_model
from bilinear_toys.data import SyntheticLanguage
from bilinear_toys.models import ModelConfig
from bilinear_toys.recovery import calibrate_thresholds, rule_losses, rule_recovery
from bilinear_toys.report import write_report
from bilinear_toys.train import build_data, train_model
from seqmem_shared.io import atomic_write_json
from seqmem_shared.train import TrainConfig


def _train(job: tuple[str, int, dict]) -> dict:
    """One (model_type, language seed) job: train, save, measure the fit per mechanism."""
    model_type, seed, a = job
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    torch.manual_seed(seed)
    t0 = time.time()
    out = Path(a["out"]) / f"{model_type}_seed{seed}"
    done = list(out.glob("toy_transformer_*.safetensors")) if a["reuse"] else []
    if done:  # analyse an earlier run's checkpoint
        print(f"[{model_type} seed {seed}] reusing {done[0]}", flush=True)
        model = load_model(done[0])
        lang = SyntheticLanguage(vocab_size=a["vocab_size"], seq_len=a["n_ctx"] + 1, seed=seed)
        metrics, t_data = {"final_val_loss": float("nan")}, 0.0
    else:
        print(f"[{model_type} seed {seed}] generating data", flush=True)
        data = build_data("synthetic", a["n_ctx"], a["batch_size"], vocab_size=a["vocab_size"], seed=seed,
                          synthetic_pool=a["steps"] * a["batch_size"], workers=a["workers"])
        lang = data.language
        t_data = time.time() - t0
        print(f"[{model_type} seed {seed}] data in {t_data:.0f}s, training", flush=True)
        cfg = ModelConfig(model_type, vocab_size=a["vocab_size"], d_model=a["d_model"], n_head=a["n_head"],
                          n_ctx=a["n_ctx"], init=a["init"], attention_impl="quadratic")
        tc = TrainConfig(max_steps=a["steps"], lr=a["lr"], optimizer="muon", weight_decay=0.0,
                         warmup_steps=a["warmup"], eval_every=max(a["steps"] // 5, 1), out_dir=str(out),
                         seed=seed, progress=False, resume=False)
        model, metrics = train_model(cfg, data, tc, out)
    model = model.float().eval()
    val = lang.generate(a["val_sequences"], seed=seed + 20_000, return_nll=True)
    return {"model_type": model_type, "seed": seed, "dir": str(out),
            "final_val_loss": metrics["final_val_loss"],
            "losses": rule_losses(model, *val, skip_trigrams=lang.rules.skip_trigrams),
            "data_s": round(t_data, 1), "train_s": round(time.time() - t0, 1)}


def _weights(directory: str) -> Path:
    return next(Path(directory).glob("toy_transformer_*.safetensors"))


def _fitted(losses: dict, margin: float) -> dict:
    """Fit criterion: every mechanism's loss (and the total) within ``margin`` nats of its floor."""
    gaps = {k: v["loss"] - v["floor"] for k, v in losses.items() if " " not in k}
    return {"gap_to_floor": {k: round(g, 3) for k, g in gaps.items()}, "margin": margin,
            "fitted": all(g < margin for g in gaps.values() if g == g)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rule_recovery")
    p.add_argument("--model_types", nargs="*", default=["attention_only_2L", "transformer_1L"])
    p.add_argument("--vocab_size", type=int, default=128)
    p.add_argument("--n_ctx", type=int, default=64)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--init", default="unit", choices=["unit", "seed"])
    p.add_argument("--max_offset", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="evaluation language")
    p.add_argument("--calibration_seed", type=int, default=1)
    p.add_argument("--val_sequences", type=int, default=2048)
    p.add_argument("--workers", type=int, default=3, help="data-generation processes per job")
    p.add_argument("--fit_margin", type=float, default=0.1, help="nats above the floor that count as fitted")
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0: leave as is)")
    p.add_argument("--reuse", action="store_true", help="analyse checkpoints already in --out, if any")
    p.add_argument("--no_report", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run")
    args = p.parse_args()
    if args.smoke:
        args.vocab_size, args.n_ctx, args.d_model, args.n_head = 64, 32, 16, 2
        args.steps, args.batch_size = 5, 4
        args.val_sequences, args.workers, args.warmup = 16, 0, 1
    a = vars(args)
    jobs = [(m, s, a) for m in args.model_types for s in (args.calibration_seed, args.seed)]
    t0 = time.time()
    if len(jobs) > 1 and not args.smoke:
        # executor workers (unlike multiprocessing.Pool's) may start the data-generation processes
        with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
            trained = list(pool.map(_train, jobs))
    else:
        trained = [_train(j) for j in jobs]
    results = {"config": a, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "train_wall_s": round(time.time() - t0, 1), "models": {}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model_type in args.model_types:
        entry = {}
        for role, seed in (("calibration", args.calibration_seed), ("evaluation", args.seed)):
            job = next(j for j in trained if j["model_type"] == model_type and j["seed"] == seed)
            model = load_model(_weights(job["dir"]), map_location=device).float().eval()
            lang = SyntheticLanguage(vocab_size=args.vocab_size, seq_len=args.n_ctx + 1, seed=seed)
            rules = lang.rules.to_dict()
            thresholds = entry["calibration"]["thresholds"] if role == "evaluation" else None
            rec = rule_recovery(model, rules, max_offset=args.max_offset, thresholds=thresholds)
            entry[role] = {**job, **_fitted(job["losses"], args.fit_margin), "recovery": rec}
            if role == "calibration":
                entry[role]["thresholds"] = calibrate_thresholds(rec)
            elif not args.no_report:
                write_report(model, Path(job["dir"]) / "report", rules=rules, max_offset=args.max_offset)
        results["models"][model_type] = entry
        ev = entry["evaluation"]
        print(json.dumps({model_type: {"losses": ev["losses"], "fitted": ev["fitted"],
                                       **{k: {kk: v[kk] for kk in ("precision", "recall", "recall_at_k")}
                                          for k, v in ev["recovery"].items() if k != "heads"},
                                       "heads": {k: ev["recovery"]["heads"][k] for k in ("previous_token",
                                                                                         "induction")}}}),
              flush=True)
    atomic_write_json(Path(args.out) / "rule_recovery.json", results)


if __name__ == "__main__":
    main()
