"""Console scripts: ``align-train`` and ``align-eval``.

``align-train --config X.yaml [--set key=value ...]`` trains (or resumes) the run of ``X.yaml``.
``align-eval --config X.yaml [--checkpoint P] [--set ...]`` evaluates a checkpoint on the fixed seeded
test set: overall and per-query-slot accuracy, printed as a table and written to ``results.json``. With
no checkpoint named (flag or ``checkpoint:`` in the config) and none under ``outputs/<run>/``, it
trains one first. A sweep file (top-level ``sweep:``, e.g. ``configs/capacity_cliff.yaml``) runs the
whole sweep (:mod:`polar_mem_mamba.sweep`) with either command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.backends import default_device
from seqmem_shared.io import atomic_write_json
from seqmem_shared.train import CheckpointError, load_checkpoint

from polar_mem_mamba.config import Config, ConfigError, read_yaml
from polar_mem_mamba.train import add_config_arguments, build_model, evaluate, load_config, train

log = logging.getLogger("seqmem")


def _is_sweep(path: str) -> bool:
    try:
        return "sweep" in read_yaml(path)
    except ConfigError:
        return False  # reported precisely by load_config


def resolve_checkpoint(config: Config, checkpoint: str | None) -> Path | None:
    """The checkpoint to evaluate: the flag, else ``config.checkpoint``, else ``run_dir/checkpoint.pt`` if
    it exists, else None (train first). A named checkpoint that does not exist is an error."""
    named = checkpoint or config.checkpoint
    if named is not None:
        path = Path(named)
        if not path.is_file():
            source = "--checkpoint" if checkpoint else "Config.checkpoint"
            raise ConfigError(f"{source}: checkpoint file not found: {path}")
        return path
    default = config.run_dir / "checkpoint.pt"
    return default if default.is_file() else None


def evaluate_run(config: Config, checkpoint: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Evaluate ``config``'s run (training it first when no checkpoint exists); writes results.json."""
    path = resolve_checkpoint(config, checkpoint)
    if path is None:
        log.info("seqmem: no checkpoint for %s; training one first", config.run_name)
        train(config)
        path = config.run_dir / "checkpoint.pt"
    device = default_device()
    model = build_model(config, device=device)
    ckpt = load_checkpoint(path, model, restore_rng=False)
    return write_results(config, model, int(ckpt["step"]), path, out)


def write_results(config: Config, model: torch.nn.Module, step: int, checkpoint: Path,
                  out: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (trained to ``step``, saved at ``checkpoint``) on the test set; write
    ``results.json`` (default ``config.run_dir / "results.json"``) and return its contents."""
    device = next(model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.precision
                in ("auto", "bf16") else torch.autocast("cpu", enabled=False))
    with autocast:
        result = evaluate(model, config, split="test")
    results = {
        "accuracy": result["accuracy"],
        "per_slot_accuracy": result["per_slot_accuracy"],
        "loss": result["loss"],
        "num_examples": result["num_examples"],
        "chance": 1.0 / config.num_pairs,
        "checkpoint": str(checkpoint),
        "step": step,
        "config": config.to_dict(),
    }
    out_path = Path(out) if out else config.run_dir / "results.json"
    atomic_write_json(out_path, results)
    results["results_path"] = str(out_path)
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: overall accuracy, then accuracy per query slot."""
    cfg = results["config"]
    lines = [f"{cfg['architecture']}  num_pairs={cfg['num_pairs']}  d_state={cfg['d_state']}  "
             f"step={results['step']}  test examples={results['num_examples']}",
             f"{'slot':>8} | accuracy", f"{'-' * 8}-+---------"]
    lines += [f"{i + 1:>8} | {acc:.4f}" for i, acc in enumerate(results["per_slot_accuracy"])]
    lines += [f"{'-' * 8}-+---------", f"{'overall':>8} | {results['accuracy']:.4f}",
              f"(a guess among the {cfg['num_pairs']} values in context: {results['chance']:.4f})"]
    return "\n".join(lines)


def _parser(prog: str, description: str, checkpoint: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    if checkpoint:
        parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: the run's checkpoint.pt)")
        parser.add_argument("--out", help="where to write results.json (default: outputs/<run>/results.json)")
    return parser


def _run_sweep(args: argparse.Namespace, evaluate_runs: bool) -> None:
    from polar_mem_mamba.sweep import run_sweep

    print(f"sweep report: {run_sweep(args.config, overrides=args.overrides, evaluate_runs=evaluate_runs)}")


def train_main(argv: Sequence[str] | None = None) -> None:
    """``align-train``."""
    parser = _parser("align-train", "Train a polar-mem-mamba model on MQAR.", checkpoint=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if _is_sweep(args.config):
            return _run_sweep(args, evaluate_runs=False)
        config = load_config(args.config, args.overrides)
        _, metrics = train(config)
    except (ConfigError, CheckpointError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{config.run_name}: trained to step {metrics.get('step')}; "
          f"checkpoint {config.run_dir / 'checkpoint.pt'}")


def eval_main(argv: Sequence[str] | None = None) -> None:
    """``align-eval``."""
    parser = _parser("align-eval", "Evaluate MQAR recall (trains first if no checkpoint exists).",
                     checkpoint=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if _is_sweep(args.config):
            return _run_sweep(args, evaluate_runs=True)
        config = load_config(args.config, args.overrides)
        results = evaluate_run(config, args.checkpoint, args.out)
    except (ConfigError, CheckpointError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(format_table(results))
    print(f"results: {results['results_path']}")
    sys.stdout.flush()
