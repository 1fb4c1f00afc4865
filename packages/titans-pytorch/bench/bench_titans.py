"""Ours vs titans-pytorch (the peer) on the issue's configurations, in one device command; prints JSON.

Both distributions import as ``titans_pytorch``, so each side runs in its own subprocess: ours from
``packages/titans-pytorch/src`` (+ ``shared/src``), the peer from ``--peer-path`` (a ``pip install
--target`` directory holding titans-pytorch 0.5.5 and its dependencies). The peer's NeuralMemory weights,
input and output are saved and loaded into ours (same parameter names) to check equal outputs.

    python packages/titans-pytorch/bench/bench_titans.py --peer-path /tmp/peer_site
    python packages/titans-pytorch/bench/bench_titans.py --only ours --quick   # CPU smoke run

Benchmarks: ``neural_memory`` (NeuralMemory(dim=384, chunk_size=64), input 2 x 1024 x 384, fp32 and bf16
autocast: forward and forward + backward ms) and ``mac_train`` (MAC training tokens/s, bf16 autocast,
batch 4 x 512, the issue's configuration); ``--full-mac`` adds the peer's train_mac.py defaults
(attention pooling, per-parameter lr, weight residual, qkv views, spectral norm). Ours also reports
``neural_memory_graphed`` (through ``graphed_memory``) and ``mac_train_eager`` (the peer's eager loop;
``mac_train`` is ours through ``TrainStep``, a CUDA graph of the whole step with fused AdamW).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
OURS_PATHS = [ROOT / "packages" / "titans-pytorch" / "src", ROOT / "shared" / "src"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_neural_memory(side: str, device: str, quick: bool, exchange: Path, graphed: bool = False) -> dict:
    """NeuralMemory(dim 384, chunk 64) forward and forward + backward ms, fp32 and bf16 autocast. Ours with
    ``graphed``: through :func:`titans_pytorch.graphed_memory` (CUDA graphs of forward and backward, one
    per precision, built outside the timing)."""
    import torch
    from titans_pytorch import NeuralMemory

    torch.manual_seed(0)
    n = 256 if quick else 1024
    mem = NeuralMemory(dim=384, chunk_size=64).to(device)
    x = torch.randn(2, n, 384, device=device)
    ckpt = exchange / "neural_memory.pt"
    result: dict = {}
    if side == "peer":
        with torch.no_grad():
            out, _ = mem(x)
        torch.save({"state_dict": mem.state_dict(), "x": x.cpu(), "out": out.cpu()}, ckpt)
    elif ckpt.exists():
        saved = torch.load(ckpt, map_location=device)
        missing = mem.load_state_dict(saved["state_dict"], strict=False)
        if not graphed:
            with torch.no_grad():
                out, _ = mem(saved["x"].to(device))
            result["max_abs_diff_vs_peer"] = (out - saved["out"].to(device)).abs().max().item()
            result["state_dict_mismatch"] = [*missing.missing_keys, *missing.unexpected_keys]
    warmup, iters = (1, 2) if quick else (3, 10)
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        # graphs need autocast without its weight-cast cache (the casts are then part of the graph)
        autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphed)
        read = lambda seq: mem(seq)[0]  # noqa: E731
        if graphed:
            from titans_pytorch import graphed_memory

            with torch.autocast(**autocast):
                read = graphed_memory(mem, x)

        def fwd(read=read, autocast=autocast):
            with torch.autocast(**autocast):
                return read(x)

        def fwd_bwd(fwd=fwd):
            fwd().float().square().mean().backward()

        result[f"{precision}_forward_ms"] = _time_ms(fwd, device, warmup, iters)
        result[f"{precision}_forward_backward_ms"] = _time_ms(fwd_bwd, device, warmup, iters)
    if device == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _mac_kwargs(full: bool, use_accelerated_scan: bool, on_cuda: bool) -> dict:
    from titans_pytorch import MemoryMLP

    mem_kwargs = dict(
        dim_head=64,
        heads=4,
        momentum=True,
        momentum_order=1,
        qk_rmsnorm=True,
        default_step_transform_max_lr=1e-1,
        use_accelerated_scan=use_accelerated_scan,
    )
    kwargs = dict(
        num_tokens=256,
        dim=384,
        depth=8,
        segment_len=32,
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4,
        neural_memory_layers=(2, 4, 6),
        neural_memory_segment_len=4,
        neural_memory_batch_size=128,
        neural_memory_model=MemoryMLP(dim=64, depth=2),
        sliding_window_attn=True,
        use_flex_attn=on_cuda,
        neural_memory_kwargs=mem_kwargs,
    )
    if full:
        mem_kwargs.update(
            attn_pool_chunks=True, per_parameter_lr_modulation=True, spectral_norm_surprises=True
        )
        kwargs.update(neural_mem_weight_residual=True, neural_memory_qkv_receives_diff_views=True)
    return kwargs


def bench_mac(
    side: str, device: str, quick: bool, full: bool, accel_scan: bool = False, eager: bool = True
) -> dict:
    """Training tokens/s. The peer and ``eager`` run the train_mac.py loop (foreach AdamW, eager); ours by
    default runs :class:`titans_pytorch.TrainStep` (CUDA graph of the whole step, fused AdamW, compiled
    dual form)."""
    import importlib.util

    import torch
    from titans_pytorch import MemoryAsContextTransformer

    torch.manual_seed(0)
    # the peer's accelerated path also imports accelerated-scan's CUDA ``warp`` extension (JIT-compiled
    # with nvcc on import), so it is opt-in; our dual engine does not use a scan at all
    accel = accel_scan and device == "cuda" and importlib.util.find_spec("accelerated_scan") is not None
    kwargs = _mac_kwargs(full, accel, device == "cuda")
    if side == "ours" and eager:
        kwargs["neural_memory_kwargs"]["compile"] = False
    model = MemoryAsContextTransformer(**kwargs).to(device)
    # titans-pytorch's per-head memory weights are expanded views of one storage, which in-place optimizer
    # updates reject; give each its own storage (speed is unaffected, and it is what training needs)
    aliased = [p for p in model.parameters() if 0 in p.stride() and p.numel() > 1]
    for p in aliased:
        p.data = p.data.clone()
    batch, seq = (1, 128) if quick else (4, 512)
    data = torch.randint(0, 256, (batch, seq + 1), device=device)
    losses = []
    if side == "ours" and not eager:
        from titans_pytorch import TrainStep

        fused = dict(fused=True, capturable=True) if device == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, **fused)
        train_step = TrainStep(
            model,
            opt,
            max_grad_norm=0.5,
            autocast_dtype=torch.bfloat16 if device == "cuda" else None,
        )

        def step():
            losses.append(train_step(data))

        warmup = 1 if quick else train_step.warmup + 2  # eager warm-up calls, the capture, then replays
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(data, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        warmup = 1 if quick else 3
    ms = _time_ms(step, device, warmup, 1 if quick else 10)
    out = {
        "step_ms": ms,
        "tokens_per_s": batch * seq / ms * 1e3,
        "batch": batch,
        "seq_len": seq,
        "accelerated_scan": accel,
        "unaliased_params": len(aliased),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    if device == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    import titans_pytorch

    exchange = Path(args.exchange)
    res = {
        "side": args.worker,
        "module": str(Path(titans_pytorch.__file__).parent),
        "device": device,
        "torch": torch.__version__,
    }
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    ours = args.worker == "ours"
    quick, accel = args.quick, args.accelerated_scan
    # eager benchmarks first: a failed CUDA-graph capture can leave the CUDA context unusable
    for name, fn in (
        ("neural_memory", lambda: bench_neural_memory(args.worker, device, quick, exchange)),
        ("mac_train_eager", lambda: bench_mac(args.worker, device, quick, False, accel)),
        ("neural_memory_graphed", lambda: bench_neural_memory(args.worker, device, quick, exchange, True)),
        ("mac_train", lambda: bench_mac(args.worker, device, quick, False, accel, eager=not ours)),
        ("mac_train_full", lambda: bench_mac(args.worker, device, quick, True, accel, eager=not ours)),
    ):
        ours_only = name.endswith(("_eager", "_graphed"))
        if (name == "mac_train_full" and not args.full_mac) or (ours_only and not ours):
            continue
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - report and keep measuring the rest
            res[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        res[name]["bench_s"] = round(time.perf_counter() - t0, 1)  # warm-up and compilation included
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print("RESULT " + json.dumps(res), flush=True)  # after every benchmark: a timeout keeps the rest


def run_side(side: str, args, exchange: str) -> dict:
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    ours = [str(p) for p in OURS_PATHS]
    if side == "ours":
        path = ours + [p for p in inherited if p != args.peer_path]
    else:
        path = [args.peer_path] + [p for p in inherited if p not in ours]
    env["PYTHONPATH"] = os.pathsep.join(path)
    cmd = [sys.executable, __file__, "--worker", side, "--exchange", exchange]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--full-mac"] if args.full_mac else []
    cmd += ["--accelerated-scan"] if args.accelerated_scan else []
    cmd += ["--skip", *args.skip] if args.skip else []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=exchange)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
                print(f"[{side}] {line.strip()}", file=sys.stderr, flush=True)  # progress
        proc.wait()
        err.seek(0)
        tail = err.read()[-2000:]
    if result is None:
        return {"side": side, "error": f"exit {proc.returncode}", "stderr_tail": tail}
    if proc.returncode:
        result["error"] = f"exit {proc.returncode} after the benchmarks above"
        result["stderr_tail"] = tail
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--peer-path", default="/tmp/peer_site", help="directory where titans-pytorch 0.5.5 is installed"
    )
    p.add_argument("--only", choices=("ours", "peer", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--full-mac", action="store_true", help="also the peer's train_mac.py defaults")
    p.add_argument(
        "--accelerated-scan",
        action="store_true",
        help="use_accelerated_scan=True in the MAC memories (the peer then JIT-builds its CUDA warp scan)",
    )
    p.add_argument(
        "--skip", nargs="*", default=[], help="benchmarks to leave out (neural_memory, mac_train_eager, ...)"
    )
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--exchange", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as exchange:
        sides = ("peer", "ours") if args.only == "both" else (args.only,)  # peer first: it writes the weights
        results = {side: run_side(side, args, exchange) for side in sides}
    summary = {}
    if args.only == "both":
        try:
            o, q = results["ours"], results["peer"]
            for suffix in ("", "_eager", "_graphed"):
                mac = o.get("mac_train" + suffix, {})
                if "tokens_per_s" in mac:
                    summary[f"mac_train{suffix}_speedup"] = (
                        mac["tokens_per_s"] / q["mac_train"]["tokens_per_s"]
                    )
                nm = o.get("neural_memory" + suffix, {})
                for prec in ("fp32", "bf16"):
                    for what, key in (("fwd_bwd", "forward_backward_ms"), ("fwd", "forward_ms")):
                        key = f"{prec}_{key}"
                        if key in nm:
                            summary[f"neural_memory{suffix}_{prec}_{what}_speedup"] = (
                                q["neural_memory"][key] / nm[key]
                            )
            if (
                "mac_train_full" in o
                and "tokens_per_s" in o["mac_train_full"]
                and "tokens_per_s" in q.get("mac_train_full", {})
            ):
                summary["mac_train_full_speedup"] = (
                    o["mac_train_full"]["tokens_per_s"] / q["mac_train_full"]["tokens_per_s"]
                )
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            summary["error"] = f"incomplete results: {exc!r}"
    print(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
