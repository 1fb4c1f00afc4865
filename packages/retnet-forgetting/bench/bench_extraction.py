"""Benchmark: states at K positions in one pass vs fla's plain forward, same run, same weights.

Random weights with the retnet-2.7B architecture (bf16; all 32 layers unless ``--layers``), batch 1,
T in {2048, 8192}, K in {1, 16, 256} evenly spaced positions (the last one is T - 1), states returned in
bf16 (accumulation fp32). Per T, fla's ``RetNetForCausalLM`` forward (``use_cache=False``, logits) and each
K's ``RetNetStateExtractor.extract_states_at_positions`` (all layers; also with the other ``--max-groups``,
positions per program of the correction kernel) are warmed up first (fla's Triton
autotuning at 2.7B dims takes a while the first time for each shape), then timed with CUDA events (median
of ``--reps`` calls). Prints one JSON object: tokens/s of both, their ratio (target >= 0.8) and the peak
CUDA memory of each extraction (model weights included). Needs CUDA and fla.

    python packages/retnet-forgetting/bench/bench_extraction.py [--lengths 2048 8192] [--ks 1 16 256]
        [--layers 32] [--out result.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from seqmem_shared.benchmarking import environment, measure, peak_memory, print_json, short_error


def positions_for(T: int, K: int) -> torch.Tensor:
    """``K`` evenly spaced columns of a ``T``-token sequence ending at ``T - 1``: ``[K]`` long (CPU)."""
    return torch.linspace(0, T - 1, K).round().long() if K > 1 else torch.tensor([T - 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the 2.7B model's 32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-groups", type=int, nargs="+", default=[8, 1],
                        help="RetNetStateExtractor(max_group=...) variants; the first is the headline")
    parser.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_extraction needs a CUDA device")
    from retnet_forgetting import RetNetStateExtractor, load_retnet_model
    from retnet_forgetting.reference import RETNET_2_7B, RetNetConfig

    arch = dict(RETNET_2_7B, attn_mode="chunk")
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model, _ = load_retnet_model(RetNetConfig(**arch), device="cuda", dtype=torch.bfloat16,
                                 implementation="fla")
    extractors = {g: RetNetStateExtractor(model, state_dtype=torch.bfloat16, max_group=g)
                  for g in args.max_groups}
    extractor = extractors[args.max_groups[0]]
    results = []
    started = time.perf_counter()
    for T in args.lengths:
        ids = torch.randint(0, arch["vocab_size"], (1, T), device="cuda")

        @torch.inference_mode()
        def fla_forward(ids=ids):
            return model(input_ids=ids, use_cache=False).logits

        fla_ms = measure(fla_forward, warmup=args.warmup, reps=args.reps).median_ms
        for K in args.ks:
            pos = positions_for(T, K)
            row = {"T": T, "K": K, "layers": arch["num_hidden_layers"], "fla_forward_ms": round(fla_ms, 3),
                   "fla_forward_tok_s": round(T / fla_ms * 1e3)}
            try:
                def extract(p=pos, ids=ids):
                    return extractor.extract_states_at_positions(ids, p)

                ms = measure(extract, warmup=args.warmup, reps=args.reps).median_ms
                peak = peak_memory(extract)
                row.update(extract_ms=round(ms, 3), extract_tok_s=round(T / ms * 1e3),
                           ratio=round(fla_ms / ms, 3), peak_mem_gib=round(peak.peak_bytes / 2**30, 2),
                           states_gib=round(K * arch["num_hidden_layers"] * _state_bytes(arch) / 2**30, 2))
                for g in args.max_groups[1:] if K > 1 else ():
                    ex = extractors[g]
                    other = measure(lambda p=pos, ids=ids, ex=ex: ex.extract_states_at_positions(ids, p),
                                    warmup=args.warmup, reps=args.reps).median_ms
                    row[f"max_group_{g}"] = {"extract_ms": round(other, 3), "ratio": round(fla_ms / other, 3)}
            except torch.cuda.OutOfMemoryError as exc:
                row["error"] = short_error(exc)
            torch.cuda.empty_cache()
            results.append(row)
            print(row, file=sys.stderr, flush=True)
        row_after = measure(fla_forward, warmup=0, reps=args.reps).median_ms  # drift check
        for row in results[-len(args.ks):]:
            row["fla_forward_ms_after"] = round(row_after, 3)
    print_json({"bench": "retnet_extraction", **environment("flash-linear-attention"), "arch": arch,
                "batch": 1, "dtype": "bfloat16", "state_dtype": "bfloat16", "reps": args.reps,
                "wall_s": round(time.perf_counter() - started, 1), "results": results}, args.out)


def _state_bytes(arch: dict) -> int:
    """Bytes of one layer's bf16 state at one position."""
    dk = int(arch["hidden_size"] * arch["expand_k"])
    dv = int(arch["hidden_size"] * arch["expand_v"])
    return dk * dv // arch["num_heads"] * 2


if __name__ == "__main__":
    main()
