"""Console scripts ``bilinear-train`` and ``bilinear-analyze``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bilinear_toys.models.config import ATTENTION_IMPLS, INITS


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilinear-train", description="Train a polynomial toy transformer.")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (offline default), simplestories, tinystories, fineweb or text:PATH")
    p.add_argument("--model_type", default="attention_only_1L",
                   help="attention_only_{n}L or transformer_{n}L")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--n_ctx", type=int, default=128)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--d_mlp", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--vocab_size", type=int, default=128, help="synthetic only (text: the tokenizer's)")
    p.add_argument("--tokenizer", default=None, help="override the dataset's tokenizer")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--init", default="unit", choices=INITS)
    p.add_argument("--attention_impl", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--no_rope", action="store_true")
    p.add_argument("--untied", action="store_true")
    p.add_argument("--qk_norm", action="store_true")
    p.add_argument("--norm", default=None, choices=["rms"])
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--time_limit_s", type=float, default=None,
                   help="stop after this many seconds of training, then evaluate and save; rerunning "
                        "resumes (default: no limit)")
    p.add_argument("--out_dir", default="runs/bilinear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--no_progress", action="store_true")
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``bilinear-train --dataset synthetic --model_type attention_only_2L ...``; prints the final metrics
    as JSON and writes ``{dataset}_{model_type}_config.json`` + ``toy_transformer_*.safetensors``."""
    args = _train_parser().parse_args(argv)
    from seqmem_shared.train import TrainConfig

    from bilinear_toys.models import ModelConfig
    from bilinear_toys.train import build_data, train_model

    data = build_data(args.dataset, args.n_ctx, args.batch_size, vocab_size=args.vocab_size, seed=args.seed,
                      tokenizer=args.tokenizer)
    model_config = ModelConfig(args.model_type, vocab_size=data.vocab_size, d_model=args.d_model,
                               n_head=args.n_head, n_ctx=args.n_ctx, dropout=args.dropout, d_mlp=args.d_mlp,
                               use_rope=not args.no_rope, tie_weights=not args.untied, qk_norm=args.qk_norm,
                               norm=args.norm, attention_impl=args.attention_impl, init=args.init)
    train_config = TrainConfig(max_steps=args.max_iters, lr=args.learning_rate, optimizer=args.optimizer,
                               weight_decay=args.weight_decay, warmup_steps=min(args.warmup, args.max_iters),
                               grad_clip=args.grad_clip, precision=args.precision,
                               eval_every=args.eval_every, out_dir=args.out_dir, seed=args.seed,
                               compile=args.compile, progress=not args.no_progress,
                               tokens_per_batch=args.batch_size * args.n_ctx, time_limit_s=args.time_limit_s)
    _, metrics = train_model(model_config, data, train_config, args.out_dir, device=args.device)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))
    return 0


def analyze_main(argv: list[str] | None = None) -> int:
    """``bilinear-analyze CHECKPOINT --out DIR``: circuit report (report.md, report.html, PNG plots)."""
    p = argparse.ArgumentParser(prog="bilinear-analyze", description="Circuit report of a toy transformer.")
    p.add_argument("checkpoint", help="toy_transformer_<dataset>_<model_type>.safetensors (or .pt)")
    p.add_argument("--config", default=None, help="config JSON (default: the one beside the checkpoint)")
    p.add_argument("--rules", default=None, help="synthetic rules JSON to score detections against")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from bilinear_toys.checkpoint import load_model
    from bilinear_toys.report import write_report

    model = load_model(args.checkpoint, args.config, map_location=args.device)
    rules = json.loads(Path(args.rules).read_text()) if args.rules else None
    path = write_report(model, args.out, top_k=args.top_k, rules=rules)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
