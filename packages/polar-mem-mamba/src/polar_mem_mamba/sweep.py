"""The capacity-cliff sweep: train what is missing, evaluate, then a CSV, heatmaps and a cliff plot.

A sweep file has three top-level keys::

    out_dir: outputs/capacity_cliff      # runs go to <out_dir>/runs/<name>/, reports to <out_dir>/
    base: {Config fields}                # shared by every run
    sweep: {Config field: [values]}      # the grid (cartesian product, in this key order), or a list
                                         # of such grids (their union, e.g. a smaller one for attention)

``python -m polar_mem_mamba.sweep --config configs/capacity_cliff.yaml [--set k=v] [--only k=a,b]
[--out-dir D] [--shard i/n | --queue | --workers W] [--report-only]``. Runs with a ``results.json``
are skipped, so an interrupted sweep continues where it stopped.

- ``--shard i/n`` trains every n-th grid point, one run after the other with the shared Trainer (an
  interrupted run resumes from its checkpoint); one process per GPU: ``CUDA_VISIBLE_DEVICES=i``.
- ``--queue`` makes this process a queue worker: it repeatedly claims (:mod:`polar_mem_mamba.claims`)
  up to ``--group-size`` unfinished runs that share their batches and trains them together
  (:func:`polar_mem_mamba.lockstep.train_lockstep`: CUDA graphs, one stream per run; ``--no-graphs``
  steps eagerly), until nothing is left or ``--time-limit`` seconds would be exceeded by another
  group. Any number of workers can share one sweep; ``--workers W`` starts W of them on this machine,
  waits, and writes the reports. Compilation and autotuning are paid once per worker process.

Reports: ``results.csv`` (one row per run), ``best_lr.md`` (table of the best-LR accuracy per
architecture x num_pairs x d_state), ``heatmap_<architecture>.png`` (accuracy over num_pairs x
d_state, best learning rate per cell by mean over seeds) and ``cliff.png`` (accuracy vs num_pairs,
one panel per d_state).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seqmem_shared.io import atomic_write, atomic_write_text

from polar_mem_mamba.claims import is_done
from polar_mem_mamba.config import ARCHITECTURES, Config, ConfigError, read_yaml
from polar_mem_mamba.train import parse_overrides

log = logging.getLogger("seqmem")

SWEEP_KEYS = ("out_dir", "base", "sweep")
_SHORT = {"architecture": "", "num_pairs": "N", "d_state": "d", "learning_rate": "lr", "seed": "s"}
CSV_FIELDS = ("run", "architecture", "num_pairs", "d_state", "learning_rate", "seed", "accuracy", "loss",
              "step")


def load_sweep(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = (),
               out_dir: str | Path | None = None) -> tuple[Path, list[Config]]:
    """(report directory, one validated Config per grid point) from a sweep file.

    ``out_dir`` replaces the file's ``out_dir``.
    """
    data = read_yaml(path)
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; expected {', '.join(SWEEP_KEYS)}")
    grids = data.get("sweep")
    grids = grids if isinstance(grids, list) else [grids]
    names = Config.field_names()
    for i, grid in enumerate(grids):
        where = "sweep" if len(grids) == 1 else f"sweep[{i}]"
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: {where}: expected a mapping of Config field: [values]")
        for key, values in grid.items():
            if key not in names:
                raise ConfigError(f"{path}: {where}: unknown Config field {key!r}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: {where}.{key}: expected a non-empty list of values, "
                                  f"got {values!r}")
    swept = list(dict.fromkeys(k for grid in grids for k in grid))
    for item in only:
        key, _, values = item.partition("=")
        if key not in swept:
            raise ConfigError(f"--only {item!r}: expected a swept field ({', '.join(swept)})=v1,v2")
        keep = [parse_overrides([f"{key}={v}"])[key] for v in values.split(",")]
        for grid in grids:
            if key in grid:
                grid[key] = [v for v in grid[key] if v in keep]
    base = dict(data.get("base") or {})
    base.update(parse_overrides(overrides))
    out_dir = Path(out_dir if out_dir is not None else data.get("out_dir", "outputs/sweep"))
    configs: dict[str, Config] = {}
    defaults = Config().to_dict()
    for grid in grids:
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            name = "-".join(f"{_SHORT.get(k, k + '=')}{v}" for k, v in point.items())
            fields = {**base, **point, "out_dir": str(out_dir / "runs"), "run_name": name}
            if isinstance(fields.get("init_from"), str):
                fields["init_from"] = _fill_init_from({**defaults, **fields}, f"{path} [{name}]")
            configs.setdefault(name, Config.from_dict(fields, source=f"{path} [{name}]"))
    check_finished_runs(configs.values())
    return out_dir, list(configs.values())


def _fill_init_from(fields: dict[str, Any], where: str) -> str:
    """A sweep's ``init_from`` names each run's own start point: ``{field}`` is that run's value of a
    Config field (a curriculum stage: ``.../runs/N8-d{d_state}-{architecture}-lr{learning_rate}-s{seed}/
    checkpoint.pt``)."""
    template = fields["init_from"]
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{where}: init_from: {template!r}: placeholders must be {{Config field}} "
                          f"({type(exc).__name__}: {exc})") from None


# Config fields that do not change what a run learns or how it is scored.
BOOKKEEPING = ("out_dir", "run_name", "progress", "log_every", "save_every", "eval_every", "checkpoint",
               "time_limit_s", "eval_batch_size", "compile")


def check_finished_runs(configs: Iterable[Config]) -> None:
    """Raise if a run's ``results.json`` was written under other settings than its grid point has now
    (run names hold only the swept values, so an edited ``base`` would otherwise silently reuse it)."""
    defaults = json.loads(json.dumps(Config().to_dict()))
    for config in configs:
        path = config.run_dir / "results.json"
        if not path.is_file():
            continue
        saved = json.loads(path.read_text()).get("config", {})
        for key, value in json.loads(json.dumps(config.to_dict())).items():
            old = saved.get(key, defaults[key])
            if key not in BOOKKEEPING and old != value:
                raise ConfigError(f"{path}: trained with {key}={old!r}, but the sweep now sets {value!r}; "
                                  "use another out_dir (--out-dir) or delete that run")


def run_sweep(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = (),
              shard: tuple[int, int] = (0, 1), evaluate_runs: bool = True, report_only: bool = False,
              out_dir: str | Path | None = None) -> Path:
    """Train + evaluate every missing grid point of this shard, then write the reports; returns the CSV."""
    from tqdm.auto import tqdm

    from polar_mem_mamba.cli import evaluate_run
    from polar_mem_mamba.train import train

    out_dir, configs = load_sweep(path, overrides, only, out_dir)
    index, count = shard
    mine = [c for i, c in enumerate(configs) if i % count == index]
    if not report_only:
        todo = [c for c in mine if not is_done(c)]
        log.info("seqmem: sweep %s: %d runs, %d in shard %d/%d, %d to do", path, len(configs), len(mine),
                 index, count, len(todo))
        for config in tqdm(todo, desc="sweep", dynamic_ncols=True):
            if evaluate_runs:
                result = evaluate_run(config)
                log.info("seqmem: %s accuracy %.4f", config.run_name, result["accuracy"])
            else:
                train(config)
    return write_reports(out_dir, configs)


def _is_device_fault(exc: BaseException) -> bool:
    """A sticky CUDA error (illegal instruction or address, ...): the process cannot use the GPU again."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or "CUDA error" in str(exc)


def run_queue(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] = (),
              group_size: int = 16, graphs: bool = True, time_limit: float | None = None,
              out_dir: str | Path | None = None) -> list[str]:
    """Be one queue worker of the sweep: claim groups of unfinished runs and train them in lockstep.

    Each round claims the first unfinished, unclaimed run in the sweep file's order (grids in the order
    listed, each in grid order) and up to ``group_size - 1`` later ones of its
    :func:`~polar_mem_mamba.lockstep.group_key`, trains them together, evaluates each (``results.json``)
    and releases them; so a sweep cut short has trained a prefix of the file's order. Stops when nothing
    is claimable or when another group would likely end after ``time_limit`` seconds (judged by the
    longest group so far).
    Returns the names of the runs this worker finished.
    """
    from polar_mem_mamba.claims import Claim
    from polar_mem_mamba.cli import write_results
    from polar_mem_mamba.lockstep import group_key, train_lockstep

    if group_size < 1:
        raise ConfigError(f"--group-size: expected an integer >= 1, got {group_size}")
    _, configs = load_sweep(path, overrides, only, out_dir)
    start, longest = time.perf_counter(), 0.0
    finished: list[str] = []
    failed: set[str] = set()
    while True:
        if time_limit is not None and time.perf_counter() - start + longest > time_limit:
            log.info("seqmem: worker %d: time limit %.0f s reached; stopping", os.getpid(), time_limit)
            break
        claims: list[Claim] = []
        key = None  # the group of the first claimable run, in the sweep file's order
        for config in configs:
            if config.run_name in failed or (key is not None and group_key(config) != key):
                continue
            claim = Claim.take(config)  # None: finished, or another worker holds it
            if claim is not None:
                claims.append(claim)
                key = group_key(config)
                if len(claims) == group_size:
                    break
        if not claims:
            break
        names = [c.config.run_name for c in claims]
        t0 = time.perf_counter()
        try:
            trained = train_lockstep([c.config for c in claims], graphs=graphs)
            for claim, (model, _) in zip(claims, trained):
                config = claim.config
                result = write_results(config, model, config.max_steps, config.run_dir / "checkpoint.pt")
                log.info("seqmem: %s accuracy %.4f", claim.config.run_name, result["accuracy"])
                finished.append(claim.config.run_name)
        except Exception as exc:  # noqa: BLE001 - keep the worker alive for the other groups
            log.error("seqmem: worker %d: group %s failed: %s", os.getpid(), names, exc)
            if _is_device_fault(exc):  # the CUDA context is gone: every later group would fail too
                log.error("seqmem: worker %d: stopping; its unfinished runs stay in the queue", os.getpid())
                break
            failed.update(n for n in names if n not in finished)
        finally:
            for claim in claims:
                claim.release()
        longest = max(longest, time.perf_counter() - t0)
        log.info("seqmem: worker %d: %d runs in %.1f s (%d finished by this worker)", os.getpid(),
                 len(claims), time.perf_counter() - t0, len(finished))
    return finished


def run_workers(path: str | Path, workers: int, overrides: Sequence[str] = (), only: Sequence[str] = (),
                group_size: int = 16, graphs: bool = True, time_limit: float | None = None,
                out_dir: str | Path | None = None) -> Path:
    """Start ``workers`` queue-worker processes on this machine, wait for them, write the reports."""
    if workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, got {workers}")
    report_dir, configs = load_sweep(path, overrides, only, out_dir)
    command = [sys.executable, "-m", "polar_mem_mamba.sweep", "--config", str(path), "--queue",
               "--group-size", str(group_size), "--out-dir", str(report_dir)]
    command += [arg for item in overrides for arg in ("--set", item)]
    command += [arg for item in only for arg in ("--only", item)]
    command += [] if graphs else ["--no-graphs"]
    command += [] if time_limit is None else ["--time-limit", str(time_limit)]
    log.info("seqmem: sweep %s: %d runs, %d to do, %d workers", path, len(configs),
             sum(not is_done(c) for c in configs), workers)
    procs = [subprocess.Popen(command) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        log.warning("seqmem: worker exit codes %s", codes)
    return write_reports(report_dir, configs)


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


def best_lr_markdown(best: dict[tuple[str, int, int], tuple[float, float]]) -> str:
    """A markdown table: one row per (architecture, num_pairs), one column per d_state, cells
    ``accuracy (lr)``; a blank cell was not run."""
    states = sorted({d for _, _, d in best})
    lines = ["| architecture | num_pairs | " + " | ".join(f"d_state {d}" for d in states) + " |",
             "| --- | ---: |" + " ---: |" * len(states)]
    for arch in _architectures(best):
        for n in sorted({n for a, n, _ in best if a == arch}):
            cells = [f"{best[key][0]:.3f} ({best[key][1]:g})" if key in best else ""
                     for key in ((arch, n, d) for d in states)]
            lines.append(f"| {arch} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _architectures(best: dict[tuple[str, int, int], tuple[float, float]]) -> list[str]:
    """The architectures in ``best``, in :data:`ARCHITECTURES` order (unknown names last)."""
    names = list(ARCHITECTURES)
    return sorted({a for a, _, _ in best}, key=lambda a: (names.index(a) if a in names else len(names), a))


def _stateless(arch: str) -> bool:
    """Whether ``arch`` has no recurrent state (attention mixers: ``d_state`` is unused)."""
    return arch in ARCHITECTURES and ARCHITECTURES[arch].mixer == "attention"


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
        best = best_lr_table(rows)
        atomic_write_text(out_dir / "best_lr.md", best_lr_markdown(best))
        plot_reports(out_dir, best)
    log.info("seqmem: sweep report: %d finished runs -> %s", len(rows), csv_path)
    return csv_path


def plot_reports(out_dir: Path, best: dict[tuple[str, int, int], tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for arch in _architectures(best):
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
        ax.set_xlabel("d_state (unused: no recurrent state)" if _stateless(arch) else "d_state")
        ax.set_ylabel("num_pairs")
        ax.set_title(f"{arch}: MQAR accuracy (best LR)")
        fig.colorbar(image, ax=ax)
        _save(fig, out_dir / f"heatmap_{arch}.png")
        plt.close(fig)
    _plot_cliff(plt, out_dir, best)


def _plot_cliff(plt: Any, out_dir: Path, best: dict[tuple[str, int, int], tuple[float, float]]) -> None:
    """cliff.png: accuracy (best LR) vs num_pairs, one panel per d_state, one line per architecture;
    attention has no state, so its line (whatever d_state it ran with) is drawn in every panel."""
    archs = _architectures(best)
    stateless = {a for a in archs if _stateless(a)}
    states = sorted({d for a, _, d in best if a not in stateless}) or sorted({d for _, _, d in best})
    fig, axes = plt.subplots(1, len(states), figsize=(3.2 * len(states) + 1, 3.4), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], states):
        for arch in archs:
            points = sorted((n, acc) for (a, n, dd), (acc, _) in best.items()
                            if a == arch and (dd == d or arch in stateless))
            if arch in stateless:
                points = sorted({n: acc for n, acc in points}.items())
            if points:
                color = f"C{list(ARCHITECTURES).index(arch)}" if arch in ARCHITECTURES else None
                ax.plot(*zip(*points), marker="o", label=arch, color=color,
                        linestyle="--" if arch in stateless else "-")
        ax.axvline(d, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("num_pairs")
        ax.set_title(f"d_state {d}")
    axes[0][0].set_ylabel("accuracy (best LR)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Capacity cliff: MQAR recall vs number of pairs (dotted: num_pairs = d_state)", y=1.04)
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
    parser.add_argument("--out-dir", help="replace the sweep file's out_dir")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                      help="run grid points i, i+n, ... one after the other")
    mode.add_argument("--queue", action="store_true", help="be one queue worker (no reports)")
    mode.add_argument("--workers", type=int, metavar="W", help="start W queue workers, then report")
    mode.add_argument("--report-only", action="store_true", help="only rebuild the CSV and plots")
    parser.add_argument("--group-size", type=int, default=16, metavar="K",
                        help="queue: runs trained together in one worker (default 16)")
    parser.add_argument("--no-graphs", action="store_true", help="queue: step eagerly, no CUDA graphs")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="queue: claim no group that would likely end after S seconds")
    args = parser.parse_args(argv)
    prefix = f"[{os.getpid()}] " if args.queue else ""
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(message)s")
    queue_args = dict(group_size=args.group_size, graphs=not args.no_graphs, time_limit=args.time_limit,
                      out_dir=args.out_dir)
    try:
        if args.queue:
            done = run_queue(args.config, args.overrides, args.only, **queue_args)
            print(f"worker {os.getpid()}: finished {len(done)} runs")
            return
        if args.workers is not None:
            csv_path = run_workers(args.config, args.workers, args.overrides, args.only, **queue_args)
        else:
            csv_path = run_sweep(args.config, args.overrides, args.only, args.shard,
                                 report_only=args.report_only, out_dir=args.out_dir)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"sweep report: {csv_path}")


if __name__ == "__main__":
    main()
