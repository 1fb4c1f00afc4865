"""Train attention_only_2L and transformer_1L on the synthetic language, then score how well the
weight-based circuit analysis (no forward pass on data) recovers the planted rules. Prints JSON and writes
it to --out (plus checkpoints and a bilinear-analyze report per model).

    python packages/bilinear-toys/bench/gpu_rule_recovery.py --out runs/rule_recovery
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bilinear_toys.models import ModelConfig
from bilinear_toys.recovery import rule_recovery
from bilinear_toys.report import write_report
from bilinear_toys.train import build_data, train_model
from seqmem_shared.io import atomic_write_json
from seqmem_shared.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rule_recovery")
    p.add_argument("--model_types", nargs="*", default=["attention_only_2L", "transformer_1L"])
    p.add_argument("--vocab_size", type=int, default=128)
    p.add_argument("--n_ctx", type=int, default=64)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max_offset", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run")
    args = p.parse_args()
    if args.smoke:
        args.vocab_size, args.n_ctx, args.d_model, args.n_head, args.steps, args.batch_size = (
            64,
            32,
            16,
            2,
            5,
            4,
        )
    out = Path(args.out)
    results = {"config": vars(args), "models": {}}
    for model_type in args.model_types:
        t0 = time.time()
        data = build_data(
            "synthetic", args.n_ctx, args.batch_size, vocab_size=args.vocab_size, seed=args.seed
        )
        cfg = ModelConfig(
            model_type,
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_head=args.n_head,
            n_ctx=args.n_ctx,
            init="unit",
            attention_impl="quadratic",
        )
        tc = TrainConfig(
            max_steps=args.steps,
            lr=args.lr,
            optimizer="muon",
            weight_decay=0.0,
            warmup_steps=min(100, args.steps // 10),
            eval_every=max(args.steps // 5, 1),
            out_dir=str(out / model_type),
            seed=args.seed,
            progress=False,
        )
        model, metrics = train_model(cfg, data, tc, out / model_type)
        model = model.float().eval()
        rec = rule_recovery(model, data.language.rules.to_dict(), max_offset=args.max_offset)
        write_report(
            model,
            out / model_type / "report",
            rules=data.language.rules.to_dict(),
            max_offset=args.max_offset,
        )
        results["models"][model_type] = {
            "final_val_loss": metrics["final_val_loss"],
            "recovery": rec,
            "train_s": round(time.time() - t0, 1),
        }
        print(json.dumps({model_type: results["models"][model_type]}), flush=True)
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    atomic_write_json(out / "rule_recovery.json", results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
