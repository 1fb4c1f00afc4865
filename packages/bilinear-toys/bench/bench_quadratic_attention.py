"""Quadratic attention: the O(N^2) masked form vs the linear (state) form, torch and Triton.

Prints one JSON object per (form, n_ctx) with forward time (ms) and peak memory (MiB), forward+backward
time and peak memory, then a summary with the measured crossovers (the shortest context from which each
linear form beats the masked form, forward only and forward+backward); the chunkwise forward+backward one
goes into ModelConfig.linear_crossover / docs (the chunkwise form is what "auto" runs; training is what
the model's dispatch serves).

Forms: ``quadratic`` (masked O(N^2)), ``linear_torch`` (chunk loop), ``linear_chunkwise`` (all chunks as
batched matmuls, autograd through it), ``linear_triton`` (Triton forward, backward recomputing through the
chunkwise form in fp32).

    python packages/bilinear-toys/bench/bench_quadratic_attention.py               # GPU, 512..16384
    python packages/bilinear-toys/bench/bench_quadratic_attention.py --smoke       # CPU, tiny
"""

from __future__ import annotations

import argparse
import json

import torch
from bilinear_toys.ops.quadratic_attention import (
    quadratic_attention_chunked,
    quadratic_attention_chunkwise,
    quadratic_attention_reference,
)
from seqmem_shared.benchmarking import environment, median_ms


def _forms(smoke: bool):
    forms = {
        "quadratic": quadratic_attention_reference,
        "linear_torch": lambda q, k, v: quadratic_attention_chunked(q, k, v, chunk_size=64),
        "linear_chunkwise": lambda q, k, v: quadratic_attention_chunkwise(q, k, v, chunk_size=64),
    }
    if torch.cuda.is_available() or smoke:
        from bilinear_toys.ops.quadratic_attention.triton import quadratic_attention_triton

        forms["linear_triton"] = lambda q, k, v: quadratic_attention_triton(q, k, v, chunk_size=64)
    return forms


def _time(fn, device: torch.device, reps: int) -> float:
    """Median ms per call (one untimed warm-up call)."""
    return median_ms(fn, warmup=1, reps=reps, device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_head", type=int, default=32)
    p.add_argument("--n_ctx", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no_backward", action="store_true")
    p.add_argument("--forms", nargs="*", default=None, help="subset of the forms (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton in the interpreter)")
    args = p.parse_args()
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.n_ctx, args.heads, args.d_head, args.reps, args.dtype = [32, 64], 1, 16, 1, "float32"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    results = []
    for fn in _forms(args.smoke).values():  # one-time costs (kernel compilation, cuBLAS/autograd setup)
        x = [torch.randn(1, 64, 1, args.d_head, device=device, dtype=dtype, requires_grad=True)
             for _ in range(3)]
        fn(*x).float().sum().backward()
    for n in args.n_ctx:
        for name, fn in _forms(args.smoke).items():
            if args.forms and name not in args.forms:
                continue
            row = {
                "form": name,
                "n_ctx": n,
                "batch": args.batch,
                "heads": args.heads,
                "d_head": args.d_head,
                "dtype": args.dtype,
                "device": environment(device=device)["device"],
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
                if device.type == "cuda":
                    row["fwd_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                    torch.cuda.reset_peak_memory_stats()
                if not args.no_backward:
                    row["fwd_bwd_ms"] = _time(
                        lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).float().sum().backward(), device, args.reps
                    )
                    if device.type == "cuda":
                        row["fwd_bwd_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            results.append(row)
    summary = {"summary": "crossover_n_ctx: shortest n_ctx from which a linear form beats quadratic"}
    for form in ("linear_triton", "linear_chunkwise"):
        for key in ("fwd_ms", "fwd_bwd_ms"):
            by = {(r["form"], r["n_ctx"]): r.get(key) for r in results}
            summary[f"crossover_n_ctx_{form}_{key[:-3]}"] = next(
                (
                    n
                    for n in args.n_ctx
                    if by.get((form, n)) is not None
                    and (by.get(("quadratic", n)) is None or by[(form, n)] < by[("quadratic", n)])
                ),
                None,
            )
    print(json.dumps(summary))

if __name__ == "__main__":
    main()
