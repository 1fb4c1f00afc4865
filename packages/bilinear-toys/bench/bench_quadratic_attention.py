"""Quadratic attention: the O(N^2) masked form vs the linear (state) form, torch and Triton.

Prints one JSON object per (form, n_ctx) with forward time (ms), forward+backward time (ms) and peak
memory (MiB), then a summary with the measured crossover (the shortest context from which the Triton
linear form's forward beats the masked form); put it in ModelConfig.linear_crossover / docs.

    python packages/bilinear-toys/bench/bench_quadratic_attention.py               # GPU, 512..16384
    python packages/bilinear-toys/bench/bench_quadratic_attention.py --smoke       # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bilinear_toys.ops.quadratic_attention import (
    quadratic_attention_chunked,
    quadratic_attention_reference,
)


def _forms(smoke: bool):
    forms = {
        "quadratic": quadratic_attention_reference,
        "linear_torch": lambda q, k, v: quadratic_attention_chunked(q, k, v, chunk_size=64),
    }
    if torch.cuda.is_available() or smoke:
        from bilinear_toys.ops.quadratic_attention.triton import quadratic_attention_triton

        forms["linear_triton"] = lambda q, k, v: quadratic_attention_triton(q, k, v, chunk_size=64)
    return forms


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_head", type=int, default=32)
    p.add_argument("--n_ctx", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no_backward", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton in the interpreter)")
    args = p.parse_args()
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.n_ctx, args.heads, args.d_head, args.reps, args.dtype = [32, 64], 1, 16, 1, "float32"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    results = []
    for n in args.n_ctx:
        for name, fn in _forms(args.smoke).items():
            row = {
                "form": name,
                "n_ctx": n,
                "batch": args.batch,
                "heads": args.heads,
                "d_head": args.d_head,
                "dtype": args.dtype,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            }
            try:
                q, k, v = (
                    torch.randn(
                        args.batch,
                        n,
                        args.heads,
                        args.d_head,
                        device=device,
                        dtype=dtype,
                        requires_grad=not args.no_backward,
                    )
                    for _ in range(3)
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    row["fwd_ms"] = _time(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), device, args.reps)
                if not args.no_backward:
                    row["fwd_bwd_ms"] = _time(
                        lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).float().sum().backward(), device, args.reps
                    )
                if device.type == "cuda":
                    row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            results.append(row)
    by = {(r["form"], r["n_ctx"]): r.get("fwd_ms") for r in results}
    crossover = next(
        (
            n
            for n in args.n_ctx
            if by.get(("linear_triton", n)) is not None
            and (by.get(("quadratic", n)) is None or by[("linear_triton", n)] < by[("quadratic", n)])
        ),
        None,
    )
    print(
        json.dumps(
            {
                "summary": "crossover_n_ctx (linear_triton fwd faster than quadratic)",
                "crossover_n_ctx": crossover,
            }
        )
    )


if __name__ == "__main__":
    main()
