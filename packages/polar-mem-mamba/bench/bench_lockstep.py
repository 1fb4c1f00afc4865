"""Throughput of lockstep training (``polar_mem_mamba.lockstep``) for sweep-sized models: one group of
K runs trained together, eager vs CUDA graphs, ``backend=torch`` (pure PyTorch) vs ``auto``
(mamba_ssm's Triton SSD kernel, autotuned on first use), all measured in the same process. Prints
one JSON object: per setting, group steps/s and run-steps/s after warm-up (the last logging window),
seconds to the first window (build, eager warm-up steps, autotuning, capture) and peak memory.

    python packages/polar-mem-mamba/bench/bench_lockstep.py --config packages/polar-mem-mamba/configs/\\
capacity_cliff_small.yaml --groups 1,16 --backends torch,auto --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from polar_mem_mamba.lockstep import train_lockstep
from polar_mem_mamba.sweep import load_sweep


def measure(configs: list, graphs: bool, steps: int) -> dict[str, float | int]:
    """Train ``configs`` (one group) for ``steps`` steps; throughput from the last metrics window."""
    with tempfile.TemporaryDirectory() as tmp:
        window = max(steps // 3, 1)
        configs = [c.replace(out_dir=tmp, max_steps=steps, log_every=window, eval_every=0, warmup_steps=0)
                   for c in configs]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trained = train_lockstep(configs, graphs=graphs)
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in (Path(configs[0].run_dir) / "metrics.jsonl").read_text().splitlines()]
        group_steps = lines[-1]["examples_per_s"] / configs[0].batch_size
        graphed = sum(bool(metrics["cuda_graph"]) for _, metrics in trained)
    return {
        "runs": len(configs),
        "graphed_runs": graphed,
        "group_steps_per_s": group_steps,
        "run_steps_per_s": group_steps * len(configs),
        "first_window_s": lines[0]["elapsed_s"],
        "wall_s": wall,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep YAML; runs are taken from its grid")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-pairs", type=int, default=32, help="the group's num_pairs")
    parser.add_argument("--groups", default="1,16", help="comma-separated group sizes K")
    parser.add_argument("--backends", default="torch,auto")
    parser.add_argument("--modes", default="eager,graphs")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    _, configs = load_sweep(args.config, args.overrides, [*args.only, f"num_pairs={args.num_pairs}"])
    configs = [c for c in configs if c.seed == configs[0].seed]
    results = []
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            for k in (int(x) for x in args.groups.split(",")):
                group = [c.replace(backend=backend) for c in configs[:k]]
                row = {"backend": backend, "mode": mode, **measure(group, mode == "graphs", args.steps)}
                print(json.dumps(row), flush=True)
                results.append(row)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print(json.dumps({
        "bench": "polar_mem_mamba.lockstep",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "num_pairs": args.num_pairs,
        "architectures": sorted({c.architecture for c in configs}),
        "batch_size": configs[0].batch_size,
        "d_model": configs[0].d_model,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
