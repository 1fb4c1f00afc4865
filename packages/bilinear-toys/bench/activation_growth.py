"""Where a polynomial toy transformer blows up: train it on the synthetic language and print, every
``--every`` steps, one JSON line with the loss, the gradient norm and, per block, the RMS and the largest
absolute value of the attention output, the MLP output and the residual stream after the block, with the
sequence position holding that largest residual value. Stops after the first non-finite loss.

Same model and recipe as ``gpu_rule_recovery.py`` (its ``build_model``; Muon for matrices, AdamW for the
rest, gradient clipping at 1, no weight decay, quadratic attention in fp32), with a linear warmup over
``--warmup`` steps and a constant rate after it::

    python3 packages/bilinear-toys/bench/activation_growth.py --model_type transformer_3L --d_model 128 \
        --lr 3e-3 --steps 100 --every 5
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator

import torch
from bilinear_toys.data.synthetic import SyntheticLanguage
from bilinear_toys.models import ToyTransformer
from bilinear_toys.train import lm_loss
from gpu_rule_recovery import DEFAULTS, build_model
from seqmem_shared.optim import build_optimizer

WATCHED = ("hook_attn_out", "hook_mlp_out", "hook_resid_post")


def block_stats(model: ToyTransformer, tokens: torch.Tensor) -> list[dict[str, float]]:
    """Per block: ``{attn_out, mlp_out, resid_post}`` RMS and max |.| (``*_rms``, ``*_max``) and
    ``argmax_position`` of the residual stream, for tokens [B, T]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(WATCHED))
    out = []
    for layer in range(model.config.n_layers):
        row: dict[str, float] = {}
        for hook in WATCHED:
            name = f"blocks.{layer}.{hook}"
            if name not in cache:  # attention-only blocks have no MLP output
                continue
            x = cache[name].float()
            key = hook.removeprefix("hook_")
            row[f"{key}_rms"], row[f"{key}_max"] = float(x.pow(2).mean().sqrt()), float(x.abs().max())
        resid = cache[f"blocks.{layer}.hook_resid_post"].abs().amax(dim=(0, 2))  # [T]
        row["argmax_position"] = int(resid.argmax())
        out.append(row)
    return out


def train_and_watch(model_type: str, d_model: int, n_head: int, vocab_size: int, n_ctx: int, init: str,
                    lr: float, batch_size: int, steps: int, every: int, warmup: int, seed: int,
                    qk_init_scale: float = 1.0) -> Iterator[dict]:
    """Yield a record every ``every`` steps (and at the first non-finite loss, then stop)."""
    torch.manual_seed(seed)
    model = build_model({**DEFAULTS, "model_type": model_type, "vocab_size": vocab_size, "d_model": d_model,
                         "n_head": n_head, "n_ctx": n_ctx, "init": init, "qk_init_scale": qk_init_scale})
    lang = SyntheticLanguage(vocab_size=vocab_size, seq_len=n_ctx + 1, seed=seed)
    pool, _ = lang.sample(max(64 * batch_size, 4096), seed=0)
    opt = build_optimizer(model, "muon", lr=lr, weight_decay=0.0)
    base = [group["lr"] for group in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group, lr0 in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr0 * min(1.0, (step + 1) / warmup)
        batch = pool[torch.randint(0, len(pool), (batch_size,), generator=gen)]
        watch = step % every == 0
        stats = block_stats(model, batch[:, :-1]) if watch else None
        loss = lm_loss(model, {"input_ids": batch, "attention_mask": torch.ones_like(batch)})[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        finite = math.isfinite(loss.item())
        if watch or not finite:
            yield {"step": step, "loss": loss.item(), "grad_norm": grad_norm,
                   "blocks": stats if stats is not None else block_stats(model, batch[:, :-1])}
        if not finite:
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_type", default="transformer_3L")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=128)
    p.add_argument("--n_ctx", type=int, default=64)
    p.add_argument("--init", default="unit", choices=["unit", "seed"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=3, help="model, data and language seed")
    p.add_argument("--qk_init_scale", type=float, default=1.0, help="multiplies the initial W_Q, W_K")
    args = p.parse_args()
    for record in train_and_watch(**vars(args)):
        print(json.dumps({"config": vars(args), **record}), flush=True)


if __name__ == "__main__":
    main()
