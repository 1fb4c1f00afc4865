"""Benchmark RMSNorm: our Triton kernel against torch eager, torch.compile and Liger-Kernel.

Prints one JSON document (and writes it to ``--out`` when given). For every hidden size ``d`` and
implementation: median time of forward-only (under ``no_grad``) and forward + backward
(``seqmem_shared.benchmarking.measure``: CUDA events per call, cold L2, grads reset between runs), the
same forward + backward captured in a CUDA graph (device time without Python/launch overhead, which
dominates at small sizes), and the peak memory the forward + backward allocates beyond its inputs.

HBM traffic floor, with ``b`` = bytes per activation element, ``bw`` per weight element, N rows:
  forward:            read x, write y, read w                     = 2*N*d*b + d*bw
  forward + backward: forward, then read x, read dy, write dx,
                      read w, write dweight                        = 5*N*d*b + 3*d*bw
(``rstd`` is not counted: a kernel may recompute it from x.) Floor time = bytes / bandwidth, with the
bandwidth measured in the same run by a device-to-device copy (bytes read + written over time).

    python shared/bench/bench_rms_norm.py [--rows 8192] [--dims 256 4096 16384] [--out results.json]
    python shared/bench/bench_rms_norm.py --tune   # sweep our launch configs per d instead
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from seqmem_shared.benchmarking import (
    copy_bandwidth_gbps,
    environment,
    median_ms,
    peak_memory,
    print_json,
    short_error,
)


def _time(fn: Callable[[], object], **kwargs) -> float:
    """Median ms of ``fn`` with a cold L2 before every call."""
    return median_ms(fn, warmup=10, reps=100, flush_l2=True, **kwargs)


def _forward(fn: Callable, x: torch.Tensor, w: torch.Tensor) -> None:
    with torch.no_grad():
        fn(x, w)


def _forward_backward(fn: Callable, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> None:
    fn(x, w).backward(dy)


def _graph_ms(fwd_bwd: Callable[[], None], x: torch.Tensor, w: torch.Tensor) -> float | str:
    """Median time of one CUDA-graph replay of ``fwd_bwd``: device time without host overhead."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fwd_bwd()
                x.grad = w.grad = None
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd_bwd()
        ms = _time(graph.replay)
        x.grad = w.grad = None
        del graph
        return round(ms, 4)
    except Exception as exc:  # noqa: BLE001 - report why an implementation cannot be captured
        x.grad = w.grad = None
        return f"not capturable ({short_error(exc, 120)})"


def _implementations(d: int, eps: float, weight: torch.nn.Parameter) -> dict[str, Callable | str]:
    from seqmem_shared.kernels.rms_norm import rms_norm, rms_norm_reference

    impls: dict[str, Callable | str] = {
        "seqmem_triton": lambda x, w: rms_norm(x, w, eps, backend="triton"),
        "torch_eager_reference": lambda x, w: rms_norm_reference(x, w, eps),
        "torch_compile_reference": torch.compile(lambda x, w: rms_norm_reference(x, w, eps), dynamic=False),
        "torch_F_rms_norm": lambda x, w: F.rms_norm(x, (d,), w, eps),
    }
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        impls["liger"] = f"unavailable ({type(exc).__name__}: {exc})"
    else:
        liger = LigerRMSNorm(d, eps=eps).to(device="cuda", dtype=weight.dtype)
        liger.weight = weight  # share the benchmark's weight tensor

        def run_liger(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            assert w is liger.weight
            return liger(x)

        impls["liger"] = run_liger
    return impls


def bench(rows: int, dims: list[int], dtype: torch.dtype, eps: float = 1e-6) -> dict:
    bandwidth = copy_bandwidth_gbps()
    results = {
        "benchmark": "rms_norm",
        **environment("liger-kernel"),
        "rows": rows,
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth_GBps": round(bandwidth, 1),
        "sizes": [],
    }
    for d in dims:
        g = torch.Generator(device="cuda").manual_seed(d)
        x = torch.randn(rows, d, device="cuda", generator=g).to(dtype).requires_grad_()
        w = torch.nn.Parameter((1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype))
        dy = torch.randn(rows, d, device="cuda", generator=g).to(dtype)
        b, bw = x.element_size(), w.element_size()
        floor_fwd = (2 * rows * d * b + d * bw) / (bandwidth * 1e9) * 1e3
        floor_fb = (5 * rows * d * b + 3 * d * bw) / (bandwidth * 1e9) * 1e3
        entry: dict = {"d": d, "floor_fwd_ms": round(floor_fwd, 4), "floor_fwd_bwd_ms": round(floor_fb, 4),
                       "impls": {}}
        for name, fn in _implementations(d, eps, w).items():
            if isinstance(fn, str):
                entry["impls"][name] = fn
                continue

            fwd = functools.partial(_forward, fn, x, w)
            # Liger writes dx into dy's storage (in_place=True): give every implementation its own dy
            fwd_bwd = functools.partial(_forward_backward, fn, x, w, dy.clone())
            fwd_bwd()  # compile / warm up
            x.grad = w.grad = None
            fwd_ms = _time(fwd)
            fb_ms = _time(fwd_bwd, grad_to_none=[x, w])
            peak = peak_memory(fwd_bwd).extra_bytes / 2**20
            x.grad = w.grad = None
            entry["impls"][name] = {"fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fb_ms, 4),
                                    "fwd_bwd_cuda_graph_ms": _graph_ms(fwd_bwd, x, w),
                                    "fwd_bwd_peak_extra_MB": round(peak, 1)}
        ours = entry["impls"]["seqmem_triton"]
        peers = {k: v for k, v in entry["impls"].items() if isinstance(v, dict)
                 and k in ("torch_eager_reference", "torch_compile_reference", "liger")}
        best = min(peers, key=lambda k: peers[k]["fwd_bwd_ms"])
        best_fwd = min(peers, key=lambda k: peers[k]["fwd_ms"])
        graphed = {k: v["fwd_bwd_cuda_graph_ms"] for k, v in peers.items()
                   if isinstance(v["fwd_bwd_cuda_graph_ms"], float)}
        entry["summary"] = {
            "best_peer_fwd_bwd": best,
            "speedup_vs_best_peer_fwd_bwd": round(peers[best]["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 3),
            "best_peer_fwd": best_fwd,
            "speedup_vs_best_peer_fwd": round(peers[best_fwd]["fwd_ms"] / ours["fwd_ms"], 3),
            "ours_over_floor_fwd_bwd": round(ours["fwd_bwd_ms"] / floor_fb, 3),
            "ours_over_floor_fwd": round(ours["fwd_ms"] / floor_fwd, 3),
            "ours_fraction_of_copy_bandwidth_fwd_bwd": round(floor_fb / ours["fwd_bwd_ms"], 3),
        }
        if graphed and isinstance(ours["fwd_bwd_cuda_graph_ms"], float):
            best_g = min(graphed, key=graphed.get)
            ours_g = ours["fwd_bwd_cuda_graph_ms"]
            entry["summary"].update({
                "best_peer_fwd_bwd_cuda_graph": best_g,
                "speedup_vs_best_peer_fwd_bwd_cuda_graph": round(graphed[best_g] / ours_g, 3),
                "ours_over_floor_fwd_bwd_cuda_graph": round(ours_g / floor_fb, 3),
            })
        results["sizes"].append(entry)
        del x, w, dy
    return results


def tune(rows: int, dims: list[int], dtype: torch.dtype, eps: float = 1e-6) -> dict:
    """Time our forward and backward kernels over a grid of launch configs; report the best per d."""
    import triton
    from seqmem_shared.kernels.rms_norm import triton as kernels

    out: dict = {**environment(), "rows": rows, "dtype": str(dtype), "sizes": []}
    for d in dims:
        x = torch.randn(rows, d, device="cuda").to(dtype)
        w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype)
        dy = torch.randn(rows, d, device="cuda").to(dtype)
        _, _, rstd = kernels.rms_norm_fwd(x, w, eps)
        block_d = triton.next_power_of_2(d)
        fused = block_d <= kernels.MAX_FUSED_BLOCK
        tiles = [(r, block_d) for r in (1, 2, 4, 8, 16, 32) if 512 <= r * block_d <= 16384] if fused else \
            [(r, bd) for r in (1, 2, 4) for bd in (2048, 4096, 8192) if r * bd <= 16384]
        fwd = functools.partial(kernels.rms_norm_fwd, x, w, eps)
        bwd = functools.partial(kernels.rms_norm_bwd, dy, x, w, rstd, x.dtype)
        fwd_times, bwd_times = [], []
        for block_r, bd in tiles:
            for warps in (2, 4, 8, 16, 32):
                if not 4 <= block_r * bd // (32 * warps) <= 64:  # elements per thread
                    continue
                cfg = kernels.Config(block_r, bd, warps)
                if fused or block_r == 1:  # the split forward takes one row per program
                    ms = _time(functools.partial(fwd, config=cfg))
                    fwd_times.append((ms, cfg))
                for pps in (1, 2, 4, 8):
                    cfg = kernels.Config(block_r, bd, warps, pps)
                    ms = _time(functools.partial(bwd, config=cfg))
                    bwd_times.append((ms, cfg))
        fwd_times.sort(key=lambda t: t[0])
        bwd_times.sort(key=lambda t: t[0])
        show = lambda times: [[round(ms, 4), cfg.__dict__] for ms, cfg in times]
        out["sizes"].append({
            "d": d,
            "default_fwd": show([(_time(fwd), kernels.fwd_config(d))]),
            "default_bwd": show([(_time(bwd), kernels.bwd_config(d))]),
            "best_fwd": show(fwd_times[:4]), "best_bwd": show(bwd_times[:6]),
        })
        print(json.dumps(out["sizes"][-1]), file=sys.stderr, flush=True)
    return out


def profile(rows: int, dims: list[int], dtype: torch.dtype, eps: float = 1e-6) -> dict:
    """Host-side cost per call (a loop of calls, one sync at the end) and a cProfile of ours."""
    import cProfile
    import io
    import pstats
    import time

    out: dict = {**environment(), "rows": rows, "sizes": []}
    for d in dims:
        x = torch.randn(rows, d, device="cuda").to(dtype).requires_grad_()
        w = torch.nn.Parameter((1 + 0.1 * torch.randn(d, device="cuda")).to(dtype))
        dy = torch.randn(rows, d, device="cuda").to(dtype)
        entry: dict = {"d": d}
        for name, fn in _implementations(d, eps, w).items():
            if isinstance(fn, str):
                continue
            for mode, call in (("fwd", functools.partial(_forward, fn, x, w)),
                               ("fwd_bwd", functools.partial(_forward_backward, fn, x, w, dy))):
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(500):
                    call()
                torch.cuda.synchronize()
                entry[f"{name}_{mode}_us_per_call"] = round((time.perf_counter() - t0) / 500 * 1e6, 1)
                x.grad = w.grad = None
        prof = cProfile.Profile()
        ours = _implementations(d, eps, w)["seqmem_triton"]
        prof.enable()
        for _ in range(300):
            _forward_backward(ours, x, w, dy)
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        entry["cprofile_ours_fwd_bwd_300_calls"] = text.getvalue().splitlines()[:60]
        out["sizes"].append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tune", action="store_true", help="sweep our kernels' launch configs instead")
    parser.add_argument("--profile", action="store_true", help="host-side cost per call and a cProfile")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rms_norm: needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    run = tune if args.tune else profile if args.profile else bench
    print_json(run(args.rows, args.dims, dtype), args.out)


if __name__ == "__main__":
    main()
