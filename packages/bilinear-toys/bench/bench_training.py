"""Training throughput (tokens/s) of ToyTransformer vs a plain eager implementation of the same model.

The peer is written here in a few lines of plain PyTorch (materialized pattern, no hooks, no dispatch):
the same parameters and maths. Both run AdamW steps under bf16 autocast on random tokens; ours optionally
with ``torch.compile`` and the linear attention form. Prints one JSON line per implementation.

    python packages/bilinear-toys/bench/bench_training.py --model_type transformer_2L --n_ctx 512
    python packages/bilinear-toys/bench/bench_training.py --smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from bilinear_toys import ModelConfig, ToyTransformer
from torch import nn


class EagerToy(nn.Module):
    """The same model as plain eager PyTorch (the peer)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.qkv = nn.ModuleList(nn.Linear(c.d_model, 3 * c.d_model, bias=False) for _ in range(c.n_layers))
        self.o = nn.ModuleList(nn.Linear(c.d_model, c.d_model, bias=False) for _ in range(c.n_layers))
        self.lr = (
            nn.ModuleList(nn.Linear(c.d_model, 2 * c.d_mlp, bias=False) for _ in range(c.n_layers))
            if c.has_mlp
            else None
        )
        self.down = (
            nn.ModuleList(nn.Linear(c.d_mlp, c.d_model, bias=False) for _ in range(c.n_layers))
            if c.has_mlp
            else None
        )
        half = c.d_head // 2
        inv = c.rope_base ** (-torch.arange(half) / half)
        ang = torch.arange(c.n_ctx)[:, None] * inv
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        t, half = x.shape[1], x.shape[-1] // 2
        c, s = self.cos[:t, None].to(x.dtype), self.sin[:t, None].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h, e = self.c.n_head, self.c.d_head
        x = self.embed(tokens)
        mask = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool))
        for i in range(self.c.n_layers):
            q, k, v = self.qkv[i](x).view(b, t, 3, h, e).unbind(2)
            q, k = self.rope(q), self.rope(k)
            pattern = (torch.einsum("bihe,bjhe->bhij", q, k) / e).square().masked_fill(~mask, 0)
            x = x + self.o[i](torch.einsum("bhij,bjhe->bihe", pattern, v).reshape(b, t, -1))
            if self.lr is not None:
                left, right = self.lr[i](x).chunk(2, -1)
                x = x + self.down[i](left * right)
        return x @ self.embed.weight.T


def bench(model: nn.Module, c: ModelConfig, batch: int, steps: int, device: torch.device) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        tokens = torch.randint(0, c.vocab_size, (batch, c.n_ctx + 1), device=device)
        with amp:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * c.n_ctx * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_type", default="transformer_2L")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.vocab_size, args.d_model, args.n_head, args.n_ctx, args.batch, args.steps = 64, 16, 2, 16, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    variants = [("eager_peer", None, False), ("ours_quadratic", "quadratic", False)]
    if device.type == "cuda":
        variants += [("ours_quadratic_compiled", "quadratic", True), ("ours_linear", "linear", False)]
    for name, impl, compiled in variants:
        c = ModelConfig(
            args.model_type,
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_head=args.n_head,
            n_ctx=args.n_ctx,
            attention_impl=impl or "quadratic",
            init="unit",
        )
        torch.manual_seed(0)
        model = (EagerToy(c) if impl is None else ToyTransformer(c)).to(device)
        run = torch.compile(model) if compiled else model
        tps = bench(run, c, args.batch, args.steps, device)
        print(
            json.dumps(
                {
                    "impl": name,
                    "tokens_per_s": round(tps, 1),
                    **{
                        k: getattr(args, k)
                        for k in ("model_type", "d_model", "n_head", "n_ctx", "batch", "vocab_size")
                    },
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
