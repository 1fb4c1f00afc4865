"""The paper's other Titans variants on the same blocks (beyond titans-pytorch):

- ``MemoryAsGateTransformer`` (MAG): sliding-window attention (with persistent tokens) and the neural
  memory read the same input in parallel; the attention output is gated by ``sigmoid(RMSNorm(memory))``.
- ``MemoryAsLayerTransformer`` (MAL): the memory is a residual layer before sliding-window attention.
- ``NeuralMemoryLM`` (LMM): the memory alone as the sequence mixer.

Each block ends with a feedforward; residuals are plain pre-norm. ``forward(ids [b, n], return_loss=False)``
-> logits [b, n, V] or the next-token loss; ``sample`` recomputes the prefix each step (no cache).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import SegmentedAttention
from .mac_transformer import FeedForward, gumbel_sample, min_p_filter
from .neural_memory import NeuralMemory

VARIANTS = ("mag", "mal", "lmm")


class _TitansLM(nn.Module):
    variant = ""

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        depth: int,
        segment_len: int = 32,
        num_persist_mem_tokens: int = 4,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        neural_memory_segment_len: int = 4,
        neural_memory_batch_size: int | None = None,
        neural_memory_model: nn.Module | None = None,
        neural_memory_kwargs: dict | None = None,
        neural_memory_layers: tuple[int, ...] | None = None,
        use_flex_attn: bool = False,
    ):
        super().__init__()
        layers = range(1, depth + 1)
        mem_layers = set(layers if neural_memory_layers is None else neural_memory_layers)
        if not mem_layers <= set(layers):
            raise ValueError(f"{type(self).__name__}: neural_memory_layers must be in 1..{depth}")
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList()
        for layer in layers:
            mem = None
            if layer in mem_layers:
                mem = NeuralMemory(
                    dim=dim,
                    chunk_size=neural_memory_segment_len,
                    batch_size=neural_memory_batch_size,
                    model=deepcopy(neural_memory_model),
                    **(neural_memory_kwargs or {}),
                )
            attn = None
            if self.variant != "lmm":
                attn = SegmentedAttention(
                    dim,
                    segment_len,
                    num_persist_mem_tokens,
                    dim_head=dim_head,
                    heads=heads,
                    sliding=True,
                    use_flex_attn=use_flex_attn,
                )
            gate_norm = nn.RMSNorm(dim) if self.variant == "mag" and mem is not None else None
            self.blocks.append(nn.ModuleList([mem, attn, gate_norm, FeedForward(dim, ff_mult)]))
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, x: Tensor, return_loss: bool = False, disable_flex_attn: bool = False):
        if x.ndim != 2:
            raise ValueError(f"{type(self).__name__}: x must be [batch, seq] token ids, got {tuple(x.shape)}")
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
        h = self.token_emb(x)
        for mem, attn, gate_norm, ff in self.blocks:
            retrieved = mem(h)[0] if mem is not None else None
            if self.variant == "mal" and retrieved is not None:
                h = h + retrieved
            if attn is not None:
                gate = torch.sigmoid(gate_norm(retrieved)) if gate_norm is not None else None
                h = h + attn(h, disable_flex_attn=disable_flex_attn, output_gating=gate)[0]
            elif retrieved is not None:
                h = h + retrieved
            h = h + ff(h)
        logits = self.to_logits(self.norm(h))
        if return_loss:
            return F.cross_entropy(rearrange(logits, "b n v -> b v n"), labels)
        return logits

    @torch.no_grad()
    def sample(
        self,
        prompt: Tensor,
        seq_len: int,
        temperature: float = 1.0,
        filter_fn: Callable = min_p_filter,
        filter_kwargs: dict | None = None,
        min_p: float | None = None,
    ) -> Tensor:
        """Continue ``prompt`` [b, p] to ``seq_len`` tokens; returns the new tokens [b, seq_len - p]."""
        was_training = self.training
        self.eval()
        kwargs = dict(filter_kwargs if filter_kwargs is not None else {"min_p": 0.1})
        if min_p is not None:
            kwargs["min_p"] = min_p
        out = prompt.clone()
        while out.shape[-1] < seq_len:
            logits = self.forward(out, disable_flex_attn=True)[:, -1]
            out = torch.cat((out, gumbel_sample(filter_fn(logits, **kwargs), temperature)), dim=-1)
        self.train(was_training)
        return out[..., prompt.shape[-1] :]


class MemoryAsGateTransformer(_TitansLM):
    """Titans MAG: ``out = SWA(x) * sigmoid(RMSNorm(M(x)))`` per block (paper section 4.2)."""

    variant = "mag"


class MemoryAsLayerTransformer(_TitansLM):
    """Titans MAL: ``x + M(x)`` then sliding-window attention per block (paper section 4.3)."""

    variant = "mal"


class NeuralMemoryLM(_TitansLM):
    """Titans LMM: the neural memory alone as the sequence mixer (paper section 4.3)."""

    variant = "lmm"
