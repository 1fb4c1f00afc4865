"""One process vs ``torchrun --nproc_per_node=N`` on the same config and global batch (``batch_size``
is split over the ranks): trains both runs (an existing run resumes), evaluates each checkpoint on the
fixed test set and prints one JSON object with their test accuracies, wall times and loss-curve
comparison. The two runs start from the same weights and draw batches from the same distribution, not
the same batches (rank ``r`` of ``N`` takes batch ``step * N + r``), so they can only agree within
run-to-run variation: a third run (one process, ``seed + 1``: other weights and batches; skip it with
``--no-reference``) measures that variation, and ``within_seed_variation`` is true when the DDP run's
loss curve is no further from the single run's than the reseeded run's is (RMS over the common logged
steps) and its test accuracy no further than the reseeded run's plus two standard errors.
``loss_curves.agree`` is the stricter test against each curve's own step-to-step noise
(``seqmem_shared.train.curves``), which a shift in when a plateau is left already fails. Without CUDA
the ranks use gloo on the CPU; on a machine with N GPUs the single runs use one GPU and the ranks one
each (NCCL).

    python packages/polar-mem-mamba/bench/compare_ddp.py \\
        --config packages/polar-mem-mamba/configs/quick.yaml --nproc 2 --out-dir outputs/compare_ddp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from polar_mem_mamba.cli import evaluate_run
from polar_mem_mamba.config import ConfigError
from polar_mem_mamba.train import load_config
from seqmem_shared.io import atomic_write_json
from seqmem_shared.train import compare_curves, read_metrics


def launch(config: str, overrides: list[str], nproc: int, out_dir: Path) -> float:
    """Train ``config`` with ``nproc`` processes (torchrun when > 1) into ``out_dir``; wall seconds."""
    sets = [arg for item in [*overrides, f"out_dir={out_dir}"] for arg in ("--set", item)]
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    start = time.perf_counter()
    subprocess.run([sys.executable, *runner, "-m", "polar_mem_mamba.train", "--config", config, *sets],
                   env=env, check=True)
    return time.perf_counter() - start


def train_and_evaluate(config_path: str, overrides: list[str], nproc: int, out: Path
                       ) -> tuple[dict[str, Any], dict[int, float]]:
    """One run (``nproc`` processes) into ``out``: its summary and its logged training-loss curve."""
    wall = launch(config_path, overrides, nproc, out)
    cfg = load_config(config_path, [*overrides, f"out_dir={out}"])
    results = evaluate_run(cfg)
    ckpt = torch.load(cfg.run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    curve = read_metrics(cfg.run_dir / "metrics.jsonl")
    summary = {"world_size": ckpt["extra"]["trainer"]["world_size"], "seed": cfg.seed,
               "step": results["step"], "test_accuracy": results["accuracy"], "test_loss": results["loss"],
               "final_train_loss": curve[max(curve)], "wall_s": round(wall, 1)}
    return summary, curve


def run(config_path: str, overrides: list[str], nproc: int, out_dir: Path, skip_fraction: float,
        threshold: float, reference: bool) -> dict[str, Any]:
    """The runs, their test results and the comparisons (see the module docstring)."""
    config = load_config(config_path, overrides)
    if nproc < 2:
        raise SystemExit(f"--nproc: expected at least 2 processes, got {nproc}")
    if config.batch_size % nproc:
        raise SystemExit(f"Config.batch_size: expected a multiple of --nproc {nproc}, "
                         f"got {config.batch_size}")
    one, curve_one = train_and_evaluate(config_path, overrides, 1, out_dir / "nproc1")
    ddp, curve_ddp = train_and_evaluate(config_path, overrides, nproc, out_dir / f"nproc{nproc}")
    p1, pn = one["test_accuracy"], ddp["test_accuracy"]
    answers = config.eval_examples * config.num_queries
    result = {
        "bench": "polar_mem_mamba.compare_ddp",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)",
        "torch": torch.__version__,
        "config": config_path, "overrides": overrides, "nproc": nproc,
        "global_batch": config.batch_size, "per_rank_batch": config.batch_size // nproc,
        "runs": {"1": one, str(nproc): ddp},
        "test_accuracy_diff": p1 - pn,
        "test_accuracy_se": math.sqrt((p1 * (1 - p1) + pn * (1 - pn)) / answers),
        "loss_curves": compare_curves(curve_one, curve_ddp, threshold, skip_fraction).to_dict(),
    }
    if reference:  # run-to-run variation: one process again, another seed (weights and batches)
        seed = config.seed + 1
        ref, curve_ref = train_and_evaluate(config_path, [*overrides, f"seed={seed}"], 1,
                                            out_dir / f"nproc1_seed{seed}")
        result["runs"][f"1_seed{seed}"] = ref
        ref_cmp = compare_curves(curve_one, curve_ref, threshold, skip_fraction).to_dict()
        result["reference_loss_curves"] = ref_cmp
        accuracy_spread = abs(p1 - ref["test_accuracy"]) + 2 * result["test_accuracy_se"]
        result["within_seed_variation"] = (result["loss_curves"]["rms_diff"] <= ref_cmp["rms_diff"]
                                           and abs(p1 - pn) <= accuracy_spread)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a polar_mem_mamba Config YAML (not a sweep)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Config field in both runs (repeatable)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    parser.add_argument("--out-dir", default="outputs/compare_ddp", help="nproc1/ and nprocN/ go here")
    parser.add_argument("--skip-fraction", type=float, default=0.1,
                        help="leave out this fraction of the first logged steps (the initial descent)")
    parser.add_argument("--threshold", type=float, default=2.0,
                        help="curves agree when the RMS of their difference <= threshold x their noise")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the third run (one process, seed + 1) that measures run-to-run variation")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    try:
        result = run(args.config, args.overrides, args.nproc, out_dir, args.skip_fraction, args.threshold,
                     not args.no_reference)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    atomic_write_json(out_dir / "compare_ddp.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
