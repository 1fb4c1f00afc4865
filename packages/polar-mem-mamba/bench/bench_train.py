"""Training throughput (examples/s) and peak memory of a polar-mem-mamba model: the pure-PyTorch
reference path (``backend=torch``) vs the fast path (``backend=auto``: mamba_ssm SSD, causal_conv1d,
flash_attn, Triton RMSNorm / cross-entropy), measured in the same run. Prints one JSON object.

    python packages/polar-mem-mamba/bench/bench_train.py                      # default model, CUDA
    python packages/polar-mem-mamba/bench/bench_train.py --config X.yaml --set batch_size=8 --steps 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from polar_mem_mamba import Config
from polar_mem_mamba.data import MQARBatches
from polar_mem_mamba.ops.ssd import load_chunk_scan, ssd_backend
from polar_mem_mamba.train import build_model, load_config, mqar_loss


def measure(config: Config, device: torch.device, steps: int, warmup: int) -> dict[str, float | str | None]:
    """Time ``steps`` full training steps (forward, backward, clip, AdamW) after ``warmup`` steps."""
    model = build_model(config, device=device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=fused)
    loss_fn = mqar_loss(config)
    batches = MQARBatches(config, config.batch_size, device)
    data = [batches(i) for i in range(4)]
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, _ = loss_fn(model, data[i % len(data)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    probe = torch.zeros(1, 1, 1, 1, device=device)
    return {
        "examples_per_s": config.batch_size * steps / seconds,
        "step_ms": 1000 * seconds / steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "ssd": ssd_backend(config.backend, probe),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML of Config fields (default: the default model and task)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", default="torch,auto", help="comma-separated Config.backend values")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides) if args.config else Config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for backend in args.backends.split(","):
        results[backend] = measure(config.replace(backend=backend), device, args.steps, args.warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "bench": "polar_mem_mamba.train_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "mamba_ssm_kernel": load_chunk_scan() is not None if device.type == "cuda" else False,
        "architecture": config.architecture,
        "batch_size": config.batch_size,
        "num_pairs": config.num_pairs,
        "d_model": config.d_model,
        "d_state": config.d_state,
        "results": results,
    }
    if "torch" in results and "auto" in results:
        speedup = results["auto"]["examples_per_s"] / results["torch"]["examples_per_s"]
        report["speedup_auto_vs_torch"] = speedup
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
