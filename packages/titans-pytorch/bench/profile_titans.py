"""Where our time goes on the device: kernels per step and host vs GPU time, as JSON.

    python packages/titans-pytorch/bench/profile_titans.py [--out profile.json]

For NeuralMemory(dim 384, chunk 64) fwd + bwd on 2 x 1024 x 384 (fp32; eager and compiled) and one MAC
training step of the issue's configuration (bf16 autocast; eager, and through TrainStep's CUDA graph
with fused AdamW, skipped with ``--no-graph``): wall ms per step, summed kernel ms,
kernel launches per step and the ten kernels with the most GPU time. Wall >> kernel time means the step
is bound by the host (Python, dispatch, launches), which CUDA graphs remove.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_titans import _mac_kwargs  # noqa: E402


def _profile(fn, warmup: int = 3) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, total = Counter(), Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += 1
            total[e.name] += e.device_time_total
    return {
        "wall_ms": wall,
        "kernel_ms": sum(total.values()) / 1e3,
        "kernels": sum(kernels.values()),
        "top": [[k[:90], kernels[k], round(v / 1e3, 3)] for k, v in total.most_common(10)],
    }


def main() -> None:
    import torch
    from titans_pytorch import MemoryAsContextTransformer, NeuralMemory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph MAC step")
    args = p.parse_args()
    res = {}
    x = torch.randn(2, 1024, 384, device="cuda")
    for name, compile in (("neural_memory_eager", False), ("neural_memory_compiled", True)):
        torch.manual_seed(0)
        mem = NeuralMemory(dim=384, chunk_size=64, compile=compile).cuda()
        res[name] = _profile(lambda mem=mem: mem(x)[0].square().mean().backward())
    torch.manual_seed(0)
    kwargs = _mac_kwargs(False, False, True)
    kwargs["neural_memory_kwargs"]["compile"] = False
    model = MemoryAsContextTransformer(**kwargs).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    data = torch.randint(0, 256, (4, 513), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res["mac_train_eager"] = _profile(step)
    if not args.no_graph:
        from titans_pytorch import TrainStep

        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True, capturable=True)
        train_step = TrainStep(model, opt, max_grad_norm=0.5)
        res["mac_train_graphed"] = _profile(lambda: train_step(data), warmup=train_step.warmup + 2)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
