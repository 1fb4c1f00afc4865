"""Where extraction time goes: per-stage CUDA-event timings of one retnet-2.7B layer, the in-chunk
correction's tile sweep, and a torch.profiler table of whole extractions (random weights, bf16, batch 1).

Stages (ms per layer): ``norm_qkv`` (attn_norm, q/k/v projections, RoPE), ``chunk_fwd_h`` (bf16 states,
as fla's forward keeps them), ``chunk_fwd_o``, fla's whole ``chunk_retention``, ``attn_out`` (gate, norm,
o_proj), ``mlp`` (mlp_norm + MLP), fla's whole layer, and the correction for K positions (``fast`` and
``ieee``), plus a tile sweep of the correction at the first length. Prints JSON (each length's stages to
stderr as they finish); ``--trace`` adds the profiler's top kernels. Needs CUDA and fla.

    python packages/retnet-forgetting/bench/profile_extraction.py [--lengths 2048 8192] [--trace]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from seqmem_shared.benchmarking import environment, measure, print_json

TILES = [(64, 64, 4, 1), (64, 128, 4, 1), (128, 128, 8, 1), (64, 64, 4, 8), (64, 128, 4, 8), (64, 64, 8, 8),
         (128, 64, 4, 8)]  # BK, BV, warps, positions per program (max_group)


def _ms(fn, reps: int = 20) -> float:
    return round(measure(fn, warmup=3, reps=reps).median_ms, 4)


@torch.inference_mode()
def layer_stages(model, T: int, ks: list[int], sweep: bool) -> dict:
    from bench_extraction import positions_for
    from fla.ops.retention import chunk_retention
    from retnet_forgetting.ops.retention import chunk_output, chunk_states, retention_log_decay
    from retnet_forgetting.ops.retention.positions import position_groups
    from retnet_forgetting.ops.retention.triton_states import states_at_positions_triton
    from retnet_forgetting.reference.layers import retention_output, retention_qkv

    block = model.model.layers[0]
    x = torch.randn(1, T, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    normed = block.attn_norm(x)
    q, k, v = retention_qkv(block.attn, normed)
    h16 = chunk_states(k, v, fp32_states=False)
    o = chunk_output(q, k, v, h16)
    log_g = retention_log_decay(k.shape[2], "cuda")
    out = {
        "norm_qkv": _ms(lambda: retention_qkv(block.attn, block.attn_norm(x))),
        "chunk_fwd_h": _ms(lambda: chunk_states(k, v, fp32_states=False)),
        "chunk_fwd_o": _ms(lambda: chunk_output(q, k, v, h16)),
        "fla_chunk_retention": _ms(lambda: chunk_retention(q, k, v)),
        "attn_out": _ms(lambda: retention_output(block.attn, o, normed)),
        "mlp": _ms(lambda: block.mlp(block.mlp_norm(x))),
        "fla_layer": _ms(lambda: block(x)),
    }
    for K in ks:
        host = positions_for(T, K)[None]
        pos, groups = host.cuda(), position_groups(host, 64, device="cuda")
        for prec in ("fast", "ieee"):
            out[f"correction_K{K}_{prec}"] = _ms(lambda prec=prec, pos=pos, groups=groups: (
                states_at_positions_triton(k, v, pos, h16, log_g, 64, torch.bfloat16, prec, groups)), reps=10)
    if not sweep:
        return out
    host = positions_for(T, max(ks))[None]
    pos = host.cuda()
    tiles = {}
    for bk, bv, warps, bp in TILES:
        groups = position_groups(host, 64, bp, "cuda")
        ms = _ms(lambda bk=bk, bv=bv, warps=warps, groups=groups: states_at_positions_triton(
            k, v, pos, h16, log_g, 64, torch.bfloat16, "fast", groups, bk, bv, warps), reps=10)
        written = pos.numel() * k.shape[2] * k.shape[3] * v.shape[3] * 2
        tiles[f"BK{bk}_BV{bv}_w{warps}_P{bp}"] = {"ms": ms, "write_GBps": round(written / ms / 1e6)}
    out[f"tile_sweep_K{max(ks)}"] = tiles
    return out


def trace(model, extractor, T: int, K: int, rows: int = 18) -> str:
    from bench_extraction import positions_for
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    pos = positions_for(T, K)
    extractor.extract_states_at_positions(ids, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        extractor.extract_states_at_positions(ids, pos)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--layers", type=int, default=2, help="layers built (stages use layer 0)")
    parser.add_argument("--trace", action="store_true", help="print torch.profiler tables to stderr")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # bench_extraction.positions_for
    from retnet_forgetting import RetNetStateExtractor, load_retnet_model
    from retnet_forgetting.reference import RETNET_2_7B, RetNetConfig

    arch = dict(RETNET_2_7B, attn_mode="chunk", num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model, _ = load_retnet_model(RetNetConfig(**arch), device="cuda", dtype=torch.bfloat16,
                                 implementation="fla")
    stages = {}
    for i, T in enumerate(args.lengths):
        stages[str(T)] = layer_stages(model, T, args.ks, sweep=i == 0)
        print(T, stages[str(T)], file=sys.stderr, flush=True)
    if args.trace:
        extractor = RetNetStateExtractor(model, state_dtype=torch.bfloat16)
        for T in args.lengths:
            for K in (1, max(args.ks)):
                print(f"== torch.profiler, {args.layers} layers, T={T}, K={K}", file=sys.stderr)
                print(trace(model, extractor, T, K), file=sys.stderr, flush=True)
    print_json({"bench": "retnet_extraction_profile", **environment("flash-linear-attention"),
                "layers_built": args.layers, "stages_ms": stages}, args.out)


if __name__ == "__main__":
    main()
