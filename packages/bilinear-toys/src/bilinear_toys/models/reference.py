"""A standard softmax transformer (pre-LayerNorm, RoPE, GELU MLP, tied embeddings): the empirical
"what can be fitted" reference for the polynomial models, trained with the same data and budget. Not
polynomial: the circuit analysis does not apply to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bilinear_toys.models.rope import Rotary


class SoftmaxBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_ctx: int, mlp: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(d_model // n_head, n_ctx)
        self.ln2 = nn.LayerNorm(d_model) if mlp else None
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        q, k = self.rotary(q), self.rotary(k)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.o(z.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x)) if self.mlp is not None else x


class SoftmaxTransformer(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab_size]; ``mlp=False``: attention only."""

    def __init__(self, vocab_size: int, d_model: int, n_head: int, n_layers: int, n_ctx: int,
                 mlp: bool = True) -> None:
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"n_head={n_head}: expected a divisor of d_model={d_model}, even quotient")
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.blocks = nn.ModuleList(SoftmaxBlock(d_model, n_head, n_ctx, mlp) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x) @ self.embed.weight.T
