"""Benchmark: states at K positions in one pass vs fla's plain forward, same run, same weights.

Random weights with the retnet-2.7B architecture (bf16), batch 1, T in {2048, 8192}, K in {1, 16, 256}
positions (all 32 layers, states returned in bf16; accumulation fp32). Prints one JSON object:
throughput in tokens/s of fla's ``RetNetForCausalLM`` forward and of ``RetNetStateExtractor``, and
their ratio (target >= 0.8). Needs CUDA and fla.

    python packages/retnet-forgetting/bench/bench_extraction.py [--lengths 2048 8192] [--ks 1 16 256]
"""

from __future__ import annotations

import argparse
import json

import torch
from seqmem_shared.benchmarking import environment, median_ms


def _time(fn, warmup: int, reps: int) -> float:
    """Median seconds per call."""
    return median_ms(fn, warmup=warmup, reps=reps, device="cuda") / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
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
    extractor = RetNetStateExtractor(model, state_dtype=torch.bfloat16)
    results = []
    for T in args.lengths:
        ids = torch.randint(0, arch["vocab_size"], (1, T), device="cuda")

        @torch.inference_mode()
        def fla_forward(ids=ids):
            return model(input_ids=ids, use_cache=False).logits

        t_fla = _time(fla_forward, args.warmup, args.reps)
        for K in args.ks:
            positions = torch.linspace(0, T - 1, K).long() if K > 1 else torch.tensor([T - 1])
            torch.cuda.reset_peak_memory_stats()
            try:
                t_ours = _time(lambda p=positions, ids=ids: extractor.extract_states_at_positions(ids, p),
                               args.warmup, args.reps)
                peak = torch.cuda.max_memory_allocated() / 2**30
                results.append({"T": T, "K": K, "fla_forward_tok_s": T / t_fla, "extract_tok_s": T / t_ours,
                                "ratio": t_fla / t_ours, "peak_mem_gib": round(peak, 2)})
            except torch.cuda.OutOfMemoryError:
                results.append({"T": T, "K": K, "fla_forward_tok_s": T / t_fla, "error": "out of memory"})
            torch.cuda.empty_cache()
    print(json.dumps({"bench": "retnet_extraction", **environment("flash-linear-attention"), "arch": arch,
                      "batch": 1, "dtype": "bfloat16", "results": results}, indent=2))


if __name__ == "__main__":
    main()
