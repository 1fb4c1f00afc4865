"""The capacity-cliff sweep: train what is missing, evaluate, then a CSV, heatmaps and a cliff plot.

A sweep file has three top-level keys::

    out_dir: outputs/capacity_cliff      # runs go to <out_dir>/runs/<name>/, reports to <out_dir>/
    base: {Config fields}                # shared by every run
    sweep: {Config field: [values]}      # the grid (cartesian product, in this key order)

``python -m polar_mem_mamba.sweep --config configs/capacity_cliff.yaml [--set k=v] [--only k=a,b]
[--shard i/n] [--report-only]``. Runs with a ``results.json`` are skipped, so an interrupted sweep
continues where it stopped (and an interrupted run resumes from its checkpoint). ``--shard i/n`` runs
every n-th grid point (one process per GPU: ``CUDA_VISIBLE_DEVICES=i ... --shard i/n``); ``--only``
restricts swept values. Reports: ``results.csv`` (one row per run), ``heatmap_<architecture>.png``
(accuracy over num_pairs x d_state, best learning rate per cell by mean over seeds) and
``cliff.png`` (accuracy vs num_pairs / d_state per architecture).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seqmem_shared.io import atomic_write, atomic_write_text

from polar_mem_mamba.config import Config, ConfigError, read_yaml
from polar_mem_mamba.train import parse_overrides

log = logging.getLogger("seqmem")

SWEEP_KEYS = ("out_dir", "base", "sweep")
_SHORT = {"architecture": "", "num_pairs": "N", "d_state": "d", "learning_rate": "lr", "seed": "s"}
CSV_FIELDS = ("run", "architecture", "num_pairs", "d_state", "learning_rate", "seed", "accuracy", "loss",
              "step")


def load_sweep(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = ()
               ) -> tuple[Path, list[Config]]:
    """(report directory, one validated Config per grid point) from a sweep file."""
    data = read_yaml(path)
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; expected {', '.join(SWEEP_KEYS)}")
    grid = data.get("sweep")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: sweep: expected a mapping of Config field: [values]")
    names = Config.field_names()
    for key, values in grid.items():
        if key not in names:
            raise ConfigError(f"{path}: sweep: unknown Config field {key!r}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.{key}: expected a non-empty list of values, got {values!r}")
    for item in only:
        key, _, values = item.partition("=")
        if key not in grid:
            raise ConfigError(f"--only {item!r}: expected a swept field ({', '.join(grid)})=v1,v2")
        keep = [parse_overrides([f"{key}={v}"])[key] for v in values.split(",")]
        grid[key] = [v for v in grid[key] if v in keep]
    base = dict(data.get("base") or {})
    base.update(parse_overrides(overrides))
    out_dir = Path(data.get("out_dir", "outputs/sweep"))
    configs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        name = "-".join(f"{_SHORT.get(k, k + '=')}{v}" for k, v in point.items())
        fields = {**base, **point, "out_dir": str(out_dir / "runs"), "run_name": name}
        configs.append(Config.from_dict(fields, source=f"{path} [{name}]"))
    return out_dir, configs


def run_sweep(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = (),
              shard: tuple[int, int] = (0, 1), evaluate_runs: bool = True, report_only: bool = False) -> Path:
    """Train + evaluate every missing grid point of this shard, then write the reports; returns the CSV."""
    from tqdm.auto import tqdm

    from polar_mem_mamba.cli import evaluate_run
    from polar_mem_mamba.train import train

    out_dir, configs = load_sweep(path, overrides, only)
    index, count = shard
    mine = [c for i, c in enumerate(configs) if i % count == index]
    if not report_only:
        todo = [c for c in mine if not (c.run_dir / "results.json").is_file()]
        log.info("seqmem: sweep %s: %d runs, %d in shard %d/%d, %d to do", path, len(configs), len(mine),
                 index, count, len(todo))
        for config in tqdm(todo, desc="sweep", dynamic_ncols=True):
            if evaluate_runs:
                result = evaluate_run(config)
                log.info("seqmem: %s accuracy %.4f", config.run_name, result["accuracy"])
            else:
                train(config)
    return write_reports(out_dir, configs)


def collect(configs: Sequence[Config]) -> list[dict[str, Any]]:
    """One CSV row per run that has a results.json."""
    rows = []
    for config in configs:
        path = config.run_dir / "results.json"
        if path.is_file():
            result = json.loads(path.read_text())
            rows.append({"run": config.run_name, "architecture": config.architecture,
                         "num_pairs": config.num_pairs, "d_state": config.d_state,
                         "learning_rate": config.learning_rate, "seed": config.seed,
                         "accuracy": result["accuracy"], "loss": result["loss"], "step": result["step"]})
    return rows


def best_lr_table(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(architecture, num_pairs, d_state) -> (accuracy, learning rate): the LR with the best seed-mean."""
    by_lr: dict[tuple[str, int, int, float], list[float]] = defaultdict(list)
    for r in rows:
        by_lr[(r["architecture"], r["num_pairs"], r["d_state"], r["learning_rate"])].append(r["accuracy"])
    best: dict[tuple[str, int, int], tuple[float, float]] = {}
    for (arch, n, d, lr), accs in by_lr.items():
        mean = sum(accs) / len(accs)
        if (arch, n, d) not in best or mean > best[(arch, n, d)][0]:
            best[(arch, n, d)] = (mean, lr)
    return best


def write_reports(out_dir: Path, configs: Sequence[Config]) -> Path:
    """results.csv, heatmap_<arch>.png and cliff.png under ``out_dir`` from the finished runs."""
    rows = collect(configs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out_dir / "results.csv"
    atomic_write_text(csv_path, buffer.getvalue())
    if rows:
        plot_reports(out_dir, best_lr_table(rows))
    log.info("seqmem: sweep report: %d finished runs -> %s", len(rows), csv_path)
    return csv_path


def plot_reports(out_dir: Path, best: dict[tuple[str, int, int], tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({a for a, _, _ in best})
    for arch in archs:
        pairs = sorted({n for a, n, _ in best if a == arch})
        states = sorted({d for a, _, d in best if a == arch})
        fig, ax = plt.subplots(figsize=(1.2 * len(states) + 2.5, 0.8 * len(pairs) + 1.8))
        grid = [[best.get((arch, n, d), (float("nan"), 0.0))[0] for d in states] for n in pairs]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
        for i, n in enumerate(pairs):
            for j, d in enumerate(states):
                if (arch, n, d) in best:
                    acc, lr = best[(arch, n, d)]
                    ax.text(j, i, f"{acc:.2f}\n{lr:g}", ha="center", va="center", fontsize=7,
                            color="white" if acc < 0.6 else "black")
        ax.set_xticks(range(len(states)), [str(d) for d in states])
        ax.set_yticks(range(len(pairs)), [str(n) for n in pairs])
        ax.set_xlabel("d_state")
        ax.set_ylabel("num_pairs")
        ax.set_title(f"{arch}: MQAR accuracy (best LR)")
        fig.colorbar(image, ax=ax)
        _save(fig, out_dir / f"heatmap_{arch}.png")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in archs:
        ratio: dict[float, list[float]] = defaultdict(list)
        for (a, n, d), (acc, _) in best.items():
            if a == arch:
                ratio[n / d].append(acc)
        xs = sorted(ratio)
        ax.plot(xs, [sum(ratio[x]) / len(ratio[x]) for x in xs], marker="o", label=arch)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_pairs / d_state")
    ax.set_ylabel("accuracy (best LR, mean over cells)")
    ax.set_ylim(0, 1.02)
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    ax.legend()
    ax.set_title("Capacity cliff")
    _save(fig, out_dir / "cliff.png")
    plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected 0 <= i < n")
    return i, n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="polar_mem_mamba.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep YAML (out_dir, base, sweep)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base Config field (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                        help="restrict a swept field to these values (repeatable)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="run grid points i, i+n, ...")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the CSV and plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        csv_path = run_sweep(args.config, args.overrides, args.only, args.shard, report_only=args.report_only)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"sweep report: {csv_path}")


if __name__ == "__main__":
    main()
