"""``ToyTransformer``: a transformer in which every component is a polynomial.

Blocks are ``x = x + attn(x)`` (quadratic attention: ``(q . k / d_head)^2``, causal, no softmax) and, for
``transformer_*`` models, ``x = x + mlp(x)`` with the bilinear layer ``P((L x) * (R x))``. RoPE on q and
k, no norms by default, tied embedding/unembedding. Weights are exposed in TransformerLens shapes
(``W_Q [L, H, d, dh]`` ...) and activations through hook points and :meth:`run_with_cache`.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from bilinear_toys.models.config import ModelConfig
from bilinear_toys.models.hooks import HookedModule, HookPoint
from bilinear_toys.models.rope import Rotary
from bilinear_toys.ops.quadratic_attention import attention_scores, causal_mask, quadratic_attention


def _rms_norm(dim: int) -> nn.Module:
    from seqmem_shared.kernels import RMSNorm

    return RMSNorm(dim)


class QuadraticAttention(nn.Module):
    """Multi-head causal attention with pattern ``(q . k / d_head)^2`` and output ``W_O(pattern @ v)``.

    The pattern is materialized (``attention_impl="quadratic"``, or whenever a hook watches
    ``hook_scores``/``hook_pattern``) or never (the linear state form). x [B, T, d] -> [B, T, d].
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.n_head, self.d_head = c.n_head, c.d_head
        inner = c.n_head * c.d_head
        self.q = nn.Linear(c.d_model, inner, bias=c.bias)
        self.k = nn.Linear(c.d_model, inner, bias=c.bias)
        self.v = nn.Linear(c.d_model, inner, bias=c.bias)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.rotary = Rotary(c.d_head, c.n_ctx, c.rope_base) if c.use_rope else None
        self.q_norm = _rms_norm(c.d_head) if c.qk_norm else None
        self.k_norm = _rms_norm(c.d_head) if c.qk_norm else None
        for name in ("q", "k", "v", "rot_q", "rot_k", "scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    def _pattern_watched(self) -> bool:
        return bool(self.hook_scores._forward_hooks or self.hook_pattern._forward_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b t (h e) -> b t h e", h=self.n_head)
                   for proj in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        scale = 1.0 / self.d_head
        impl = self.config.attention_impl
        if impl == "quadratic" or self._pattern_watched():
            scores = self.hook_scores(attention_scores(q, k, scale))
            pattern = self.hook_pattern(scores.square() * causal_mask(q.shape[1], k.shape[1], q.device))
            z = einsum(pattern, v, "b h i j, b j h e -> b i h e")
        else:
            z = quadratic_attention(q, k, v, scale, impl=impl, crossover=self.config.linear_crossover)
        z = self.hook_z(z)
        if self.hook_result._forward_hooks:  # per-head outputs [B, T, H, d], only when watched
            w_o = rearrange(self.o.weight, "d (h e) -> h e d", h=self.n_head)
            self.hook_result(einsum(z, w_o, "b t h e, h e d -> b t h d"))
        return self.o(rearrange(z, "b t h e -> b t (h e)"))


class BilinearLayer(nn.Module):
    """``P((L x) * (R x))``: x [B, T, d] -> [B, T, d] through a hidden width ``d_mlp``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.left = nn.Linear(config.d_model, config.d_mlp, bias=config.bias)
        self.right = nn.Linear(config.d_model, config.d_mlp, bias=config.bias)
        self.down = nn.Linear(config.d_mlp, config.d_model, bias=config.bias)
        self.hook_pre = HookPoint()         # L x
        self.hook_pre_linear = HookPoint()  # R x
        self.hook_post = HookPoint()        # (L x) * (R x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hook_post(self.hook_pre(self.left(x)) * self.hook_pre_linear(self.right(x))))


class Block(nn.Module):
    """``x + attn(x)`` then, with an MLP, ``+ mlp(x)`` (optionally pre-normed)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln1 = _rms_norm(config.d_model) if config.norm == "rms" else None
        self.attn = QuadraticAttention(config)
        self.ln2 = _rms_norm(config.d_model) if config.norm == "rms" and config.has_mlp else None
        self.mlp = BilinearLayer(config) if config.has_mlp else None
        self.dropout = nn.Dropout(config.dropout)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        h = self.attn(self.ln1(x) if self.ln1 is not None else x)
        x = self.hook_resid_mid(x + self.dropout(self.hook_attn_out(h)))
        if self.mlp is not None:
            h = self.mlp(self.ln2(x) if self.ln2 is not None else x)
            x = x + self.dropout(self.hook_mlp_out(h))
        return self.hook_resid_post(x)


class ToyTransformer(HookedModule):
    """tokens [B, T] (int64) -> logits [B, T, vocab_size]. See :class:`ModelConfig` for the variants."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = _rms_norm(config.d_model) if config.norm == "rms" else None
        self.unembed = (None if config.tie_weights
                        else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.reset_parameters()
        self.setup_hooks()

    def reset_parameters(self) -> None:
        """Zero biases and output projections (attn ``o``, MLP ``down``); other weights normal.

        ``init="seed"``: std ``init_std`` everywhere (the seed's recipe). ``init="unit"``: embeddings with
        std ``d^-1/4`` (tied logits start O(1)), q/k with std ``(d_head/d)^1/4`` (scores ``q.k/d_head``
        start O(1)), other projections ``1/sqrt(fan_in)``. Without norms the pattern is degree 4 in the
        weights: at ``init_std=0.02`` it starts near 1e-10 and attention barely learns.
        """
        c = self.config
        unit = c.init == "unit"
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, c.d_model**-0.25 if unit else c.init_std)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, module.in_features**-0.5 if unit else c.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if unit:
            for block in self.blocks:
                for proj in (block.attn.q, block.attn.k):
                    nn.init.normal_(proj.weight, 0.0, (c.d_head / c.d_model) ** 0.25)
        for block in self.blocks:
            nn.init.zeros_(block.attn.o.weight)
            if block.mlp is not None:
                nn.init.zeros_(block.mlp.down.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, seq], got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        x = self.hook_embed(self.dropout(self.embed(tokens)))
        for block in self.blocks:
            x = block(x)
        if self.ln_final is not None:
            x = self.ln_final(x)
        return x @ self.W_U

    # ------------------------------------------------------------- TransformerLens-style weights

    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(b) for b in self.blocks])

    def _heads_in(self, w: torch.Tensor) -> torch.Tensor:
        return rearrange(w, "(h e) d -> h d e", h=self.config.n_head)

    def _mlp(self, name: str):
        if not self.config.has_mlp:
            raise ValueError(f"{name}: model_type={self.config.model_type!r} has no MLP")
        return self

    @property
    def W_E(self) -> torch.Tensor:
        """[V, d]"""
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """[d, V] (the transposed embedding when tied)"""
        return self.embed.weight.T if self.unembed is None else self.unembed.weight.T

    @property
    def W_Q(self) -> torch.Tensor:
        """[L, H, d, dh]"""
        return self._stack(lambda b: self._heads_in(b.attn.q.weight))

    @property
    def W_K(self) -> torch.Tensor:
        """[L, H, d, dh]"""
        return self._stack(lambda b: self._heads_in(b.attn.k.weight))

    @property
    def W_V(self) -> torch.Tensor:
        """[L, H, d, dh]"""
        return self._stack(lambda b: self._heads_in(b.attn.v.weight))

    @property
    def W_O(self) -> torch.Tensor:
        """[L, H, dh, d]"""
        return self._stack(lambda b: rearrange(b.attn.o.weight, "d (h e) -> h e d", h=self.config.n_head))

    @property
    def W_L(self) -> torch.Tensor:
        """[L, d, d_mlp]"""
        return self._mlp("W_L")._stack(lambda b: b.mlp.left.weight.T)

    @property
    def W_R(self) -> torch.Tensor:
        """[L, d, d_mlp]"""
        return self._mlp("W_R")._stack(lambda b: b.mlp.right.weight.T)

    @property
    def W_P(self) -> torch.Tensor:
        """[L, d_mlp, d]"""
        return self._mlp("W_P")._stack(lambda b: b.mlp.down.weight.T)

    @property
    def OV(self) -> torch.Tensor:
        """[L, H, d, d]: ``W_V @ W_O`` per head (row-vector convention: ``x @ OV``)."""
        return self.W_V @ self.W_O

    @property
    def QK(self) -> torch.Tensor:
        """[L, H, d, d]: ``W_Q @ W_K^T`` per head, content only (no RoPE rotation)."""
        return self.W_Q @ self.W_K.transpose(-1, -2)
