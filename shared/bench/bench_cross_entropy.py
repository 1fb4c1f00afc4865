"""Benchmark cross_entropy and linear_cross_entropy against torch eager, torch.compile and Liger-Kernel.

Prints one JSON document (and writes it to ``--out`` when given). Label smoothing 0.1, bf16 inputs,
forward + backward timed with ``seqmem_shared.benchmarking.measure`` (median of CUDA-event times, cold L2,
gradients reset between runs), and
the peak memory of one forward + backward: ``peak_GB`` counts everything allocated (inputs included),
``extra_GB`` what the step allocates beyond its inputs.

cross_entropy, N tokens x V classes of ``b``-byte logits: the HBM floor of forward + backward is reading
the logits once and writing their gradient once, ``2 N V b`` bytes, over the bandwidth of a
device-to-device copy measured in the same run. Peers: ``torch_fp32`` = ``F.cross_entropy`` on
float32-upcast logits (the usual convention), ``torch_bf16`` = on the bf16 logits directly,
``torch_compile`` = the fp32 form under ``torch.compile``, ``liger`` = ``LigerCrossEntropyLoss``.

linear_cross_entropy, hidden ``[N, d]`` and weight ``[V, d]``: ours vs ``F.linear`` + fp32
``F.cross_entropy`` vs ``LigerFusedLinearCrossEntropyLoss``. ``extra_minus_weight_GB`` subtracts the
weight-sized terms (our float32 accumulator and one bf16 copy: the padded W, then the returned gradient),
which leaves what grows with N
and the chunk buffer, not with V.

    python shared/bench/bench_cross_entropy.py [--tokens 16384] [--vocabs 8192 50257] [--dims 256 4096]
    python shared/bench/bench_cross_entropy.py --sweep   # time our kernel over (BLOCK_V, num_warps, grid)
"""

from __future__ import annotations

import argparse
import functools
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

SMOOTHING = 0.1


def _measure(step: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> dict | str:
    """Time and peak memory of ``step`` (forward, returns the loss) followed by ``loss.backward()``."""
    def fwd_bwd():
        loss = step()
        loss.backward()
        return loss

    try:
        loss = fwd_bwd()  # compile / warm up
        for t in leaves:
            t.grad = None
        ms = median_ms(fwd_bwd, warmup=10, reps=100, grad_to_none=leaves, flush_l2=True)
        peak, extra = peak_memory(fwd_bwd)
        for t in leaves:
            t.grad = None
        return {"ms": round(ms, 4), "peak_GB": round(peak / 1e9, 3), "extra_GB": round(extra / 1e9, 3),
                "loss": round(loss.item(), 5)}
    except Exception as exc:  # noqa: BLE001 - report (e.g. out of memory) and go on with the others
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
        return f"failed ({short_error(exc)})"


def _liger(name: str):
    try:
        import liger_kernel.transformers as lt

        return getattr(lt, name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"unavailable ({short_error(exc)})"


def bench_cross_entropy(tokens: int, vocab: int, bandwidth: float) -> dict:
    from seqmem_shared.kernels.cross_entropy import cross_entropy

    g = torch.Generator(device="cuda").manual_seed(vocab)
    base = (2 * torch.randn(tokens, vocab, device="cuda", generator=g)).to(torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t, label_smoothing=SMOOTHING),
                             dynamic=False)
    liger_cls = _liger("LigerCrossEntropyLoss")
    impls: dict[str, Callable | str] = {
        "ours": lambda x: cross_entropy(x, target, SMOOTHING, backend="triton"),
        "ours_inplace_backward": lambda x: cross_entropy(x, target, SMOOTHING, backend="triton",
                                                         inplace_backward=True),
        "torch_fp32": lambda x: F.cross_entropy(x.float(), target, label_smoothing=SMOOTHING),
        "torch_bf16": lambda x: F.cross_entropy(x, target, label_smoothing=SMOOTHING),
        "torch_compile": lambda x: compiled(x, target),
        "liger": liger_cls if isinstance(liger_cls, str) else
        functools.partial(liger_cls(label_smoothing=SMOOTHING), target=target),
    }
    floor_ms = 2 * base.numel() * base.element_size() / (bandwidth * 1e9) * 1e3
    entry: dict = {"tokens": tokens, "vocab": vocab, "logits_GB": round(base.numel() * 2 / 1e9, 3),
                   "floor_ms": round(floor_ms, 4), "results": {}}
    for name, fn in impls.items():
        if isinstance(fn, str):
            entry["results"][name] = fn
            continue
        x = base.clone().requires_grad_()  # in-place implementations overwrite their own copy
        entry["results"][name] = _measure(functools.partial(fn, x), [x])
        del x
        torch.cuda.empty_cache()
    ours = entry["results"]["ours"]
    if isinstance(ours, dict):
        entry["ours_over_floor"] = round(ours["ms"] / floor_ms, 3)
        entry["ours_peak_over_logits_plus_grad"] = round((entry["logits_GB"] + ours["extra_GB"])
                                                         / (2 * entry["logits_GB"]), 3)
    return entry


def bench_linear(tokens: int, dim: int, vocab: int) -> dict:
    from seqmem_shared.kernels.cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(dim * vocab)
    h = torch.randn(tokens, dim, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, dim, device="cuda", generator=g) / dim**0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    liger_cls = _liger("LigerFusedLinearCrossEntropyLoss")
    liger = liger_cls if isinstance(liger_cls, str) else liger_cls(label_smoothing=SMOOTHING)
    impls: dict[str, Callable | str] = {
        "ours": lambda: linear_cross_entropy(h, w, target, label_smoothing=SMOOTHING, backend="triton"),
        "torch": lambda: F.cross_entropy(F.linear(h, w).float(), target, label_smoothing=SMOOTHING),
        "liger": liger if isinstance(liger, str) else lambda: liger(w, h, target),
    }
    entry: dict = {"tokens": tokens, "d": dim, "vocab": vocab, "results": {}}
    for name, fn in impls.items():
        entry["results"][name] = fn if isinstance(fn, str) else _measure(fn, [h, w])
        torch.cuda.empty_cache()
    ours = entry["results"]["ours"]
    if isinstance(ours, dict):
        # the float32 accumulator + one bf16 W-sized tensor (the zero-padded copy of W in the forward,
        # the returned gradient in the backward; never both at once)
        weight_terms = vocab * dim * (4 + 2) / 1e9
        ours["extra_minus_weight_GB"] = round(ours["extra_GB"] - weight_terms, 3)
    return entry


def sweep(tokens: int, vocabs: list[int], bandwidth: float) -> list[dict]:
    """Time of the forward-with-gradient kernel over (BLOCK_V, num_warps, num_stages, programs);
    unaligned rows at the default config."""
    from seqmem_shared.kernels.cross_entropy import triton as kernels

    out = []
    for vocab in vocabs:
        flat = (2 * torch.randn(tokens * vocab + 8, device="cuda")).to(torch.bfloat16)
        target = torch.randint(0, vocab, (tokens,), device="cuda")
        loss = torch.empty(tokens, device="cuda")
        lse = torch.empty_like(loss)
        scale = torch.ones((), device="cuda")
        floor_ms = 2 * tokens * vocab * 2 / (bandwidth * 1e9) * 1e3
        rows = []
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        default = kernels._config(vocab)
        shapes = ((1024, 4, 1), (1024, 4, 3), (2048, 4, 1), (2048, 4, 3), (4096, 8, 1), (4096, 8, 3),
                  (4096, 16, 3), (8192, 8, 3))
        grid = [(block, warps, stages, programs, hints) for block, warps, stages in shapes
                for programs in (None, 2 * sms) for hints in (True, False)]
        for offset in (0, 1):  # offset 1: rows never 16-byte aligned (element-wise loads and stores)
            logits = flat[offset:offset + tokens * vocab].view(tokens, vocab)
            grad = torch.empty_like(flat)[offset:offset + tokens * vocab].view(tokens, vocab)
            for block, warps, stages, programs, hints in grid if offset == 0 else [(*default, True)]:
                config = {"block_v": block, "warps": warps, "stages": stages, "programs": programs,
                          "l2_hints": hints, "offset": offset}
                run = functools.partial(kernels.launch, logits, target, lse=lse, loss=loss, grad=grad,
                                        scale=scale, label_smoothing=SMOOTHING, ignore_index=-100,
                                        block_v=block, num_warps=warps, num_stages=stages, programs=programs,
                                        l2_hints=hints)
                try:
                    ms = median_ms(run, warmup=5, reps=50, flush_l2=True)
                except Exception as exc:  # noqa: BLE001 - e.g. out of resources for a config
                    rows.append(config | {"error": short_error(exc)})
                    continue
                rows.append(config | {"ms": round(ms, 4), "over_floor": round(ms / floor_ms, 3)})
        out.append({"vocab": vocab, "tokens": tokens, "floor_ms": round(floor_ms, 4),
                    "default_config": default, "configs": sorted(rows, key=lambda r: r.get("ms", 1e9))})
        del flat
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 50257])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="sweep our launch configs instead")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cross_entropy: needs a CUDA device")
    bandwidth = copy_bandwidth_gbps()
    results: dict = {
        "benchmark": "cross_entropy",
        **environment("liger-kernel"),
        "dtype": "bfloat16",
        "label_smoothing": SMOOTHING,
        "copy_bandwidth_GBps": round(bandwidth, 1),
    }
    if args.sweep:
        results["sweep"] = sweep(args.tokens, args.vocabs, bandwidth)
    else:
        results["cross_entropy"] = [bench_cross_entropy(args.tokens, v, bandwidth)
                                    for v in args.vocabs]
        if not args.skip_linear:
            results["linear_cross_entropy"] = [bench_linear(args.tokens, d, v)
                                               for d in args.dims for v in args.vocabs]
    print_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
