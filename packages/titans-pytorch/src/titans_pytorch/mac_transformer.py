"""Memory as Context (MAC) transformer, following Titans section 4.1.

Each layer with neural memory reads the memory for every token of the current segment (queries from
the segment itself, memory weights as of the previous chunks) and attends over
[persistent memory || retrieved memory || segment]; the memory learns from the layer's input stream.
Layers without memory attend over [persistent memory || segment]. See the package README for how this
differs from titans-pytorch (which runs memory before attention with learned "long-term" tokens).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
import tqdm
from einops import einsum, rearrange
from torch import Tensor, nn

from .attention import SegmentedAttention, flex_attention, flex_attention_available
from .neural_memory import NeuralMemory

MACCache = namedtuple("MACCache", ("seq_index", "kv_caches", "neural_mem_caches"))


def min_p_filter(logits: Tensor, min_p: float = 0.1) -> Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top one (arXiv 2407.01082)."""
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


def gumbel_sample(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Sample [b, 1] token ids; argmax when ``temperature`` is 0 (draws the same noise either way)."""
    noise = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)).clamp(min=1e-20))
    if temperature > 0:
        logits = logits / temperature + noise
    return logits.argmax(dim=-1, keepdim=True)


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def FeedForward(dim: int, mult: float = 4) -> nn.Sequential:  # noqa: N802 - titans-pytorch name
    inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, inner * 2), GEGLU(), nn.Linear(inner, dim))


class HyperConnection(nn.Module):
    """Static hyper-connection over ``num_streams`` residual streams (arXiv 2409.19606).

    ``forward(streams [s, b, n, d]) -> (branch input [b, n, d], add(branch_out) -> new streams)``;
    initialised to the plain residual: the branch reads stream ``index % s`` and adds its output to it.
    With ``write=False`` the module only reads (for branches whose output is not added back).
    """

    def __init__(self, num_streams: int, index: int, write: bool = True):
        super().__init__()
        pick = torch.zeros(num_streams)
        pick[index % num_streams] = 1.0
        self.read = nn.Parameter(pick.clone())
        self.mix = nn.Parameter(torch.eye(num_streams)) if write else None
        self.write = nn.Parameter(pick.clone()) if write else None

    def forward(self, streams: Tensor):
        branch_in = einsum(self.read, streams, "s, s b n d -> b n d")

        def add(out: Tensor) -> Tensor:
            mixed = einsum(self.mix, streams, "r s, s b n d -> r b n d")
            return mixed + self.write[:, None, None, None] * out

        return branch_in, add


class MemoryAsContextTransformer(nn.Module):
    """Byte/token language model with Titans MAC layers; keywords as in titans-pytorch 0.5.x.

    ``forward(x [b, n] ids, return_loss=False, ..., cache=None, return_cache=False)`` -> logits
    [b, n, num_tokens] (or the next-token loss with ``return_loss``; or ``(logits, cache)``).
    ``num_longterm_mem_tokens``, ``neural_memory_add_value_residual`` and ``token_emb`` are accepted for
    compatibility; the first two have no effect here (retrieved memory tokens replace long-term tokens).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        depth: int,
        segment_len: int,
        neural_memory_segment_len: int | None = None,
        neural_mem_gate_attn_output: bool = False,
        neural_memory_add_value_residual: bool = False,
        num_longterm_mem_tokens: int = 0,
        num_persist_mem_tokens: int = 0,
        neural_memory_batch_size: int | None = None,
        neural_memory_qkv_receives_diff_views: bool = False,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        num_residual_streams: int = 4,
        neural_memory_model: nn.Module | None = None,
        neural_memory_kwargs: dict | None = None,
        neural_memory_layers: tuple[int, ...] | None = None,
        use_flex_attn: bool = False,
        sliding_window_attn: bool = False,
        neural_mem_weight_residual: bool = False,
        token_emb: nn.Module | None = None,
    ):
        super().__init__()
        if depth < 1 or dim < 1 or num_tokens < 1:
            raise ValueError("MemoryAsContextTransformer: num_tokens, dim and depth must be >= 1")
        self.token_emb = token_emb if token_emb is not None else nn.Embedding(num_tokens, dim)
        self.segment_len = segment_len
        self.num_longterm_mem_tokens = num_longterm_mem_tokens
        self.num_persist_mem_tokens = num_persist_mem_tokens
        self.sliding_window_attn = sliding_window_attn
        self.neural_memory_segment_len = neural_memory_segment_len or segment_len
        self.gate_attn_output = neural_mem_gate_attn_output
        self.neural_mem_weight_residual = neural_mem_weight_residual
        self.use_flex_attn = use_flex_attn
        self.num_streams = num_residual_streams
        layers = tuple(range(1, depth + 1))
        mem_layers = set(layers if neural_memory_layers is None else neural_memory_layers)
        bad = [i for i in mem_layers if i not in layers]
        if bad:
            raise ValueError(
                f"MemoryAsContextTransformer: neural_memory_layers must be in 1..{depth}, got {bad}"
            )
        self.neural_memory_layers = tuple(sorted(mem_layers))
        kwargs = dict(neural_memory_kwargs or {})
        self.layers = nn.ModuleList()
        first_mem = True
        for layer in layers:
            mem = selector = mem_hc = None
            if layer in mem_layers:
                mem_hc = HyperConnection(num_residual_streams, 3 * (layer - 1), write=False)
                views = neural_memory_qkv_receives_diff_views and layer != 1
                if views:
                    choices = (layer - 1) * 4 + 1
                    selector = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, 3 * choices))
                mem = NeuralMemory(
                    dim=dim,
                    chunk_size=self.neural_memory_segment_len,
                    batch_size=neural_memory_batch_size,
                    model=deepcopy(neural_memory_model),
                    qkv_receives_diff_views=views,
                    accept_weight_residual=neural_mem_weight_residual and not first_mem,
                    **kwargs,
                )
                first_mem = False
            attn = SegmentedAttention(
                dim=dim,
                segment_len=segment_len,
                num_persist_mem_tokens=num_persist_mem_tokens,
                num_longterm_mem_tokens=num_longterm_mem_tokens,
                dim_head=dim_head,
                heads=heads,
                sliding=sliding_window_attn,
                accept_value_residual=layer != 1,
                use_flex_attn=use_flex_attn,
            )
            self.layers.append(
                nn.ModuleList(
                    [
                        mem_hc,
                        HyperConnection(num_residual_streams, 3 * (layer - 1) + 1),
                        HyperConnection(num_residual_streams, 3 * (layer - 1) + 2),
                        selector,
                        mem,
                        attn,
                        FeedForward(dim, ff_mult),
                    ]
                )
            )
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(
        self,
        x: Tensor,
        return_loss: bool = False,
        return_loss_breakdown: bool = False,
        disable_flex_attn: bool = False,
        cache: MACCache | None = None,
        return_cache: bool = False,
        factorized_pos_emb: Tensor | None = None,
    ):
        if x.ndim != 2:
            raise ValueError(
                f"MemoryAsContextTransformer: x must be [batch, seq] token ids, got {tuple(x.shape)}"
            )
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
        start = 0 if cache is None else cache.seq_index
        if cache is not None:
            x = x[:, start:]
        kv_caches = iter(cache.kv_caches if cache is not None else [])
        mem_caches = iter(cache.neural_mem_caches if cache is not None else [])
        next_kv, next_mem = [], []
        h = self.token_emb(x)
        streams = h.unsqueeze(0).expand(self.num_streams, *h.shape)
        value_residual = prev_updates = None
        prev_first_row = 0  # stored-chunk row at which the previous memory's ``updates`` start
        layer_points = []
        for mem_hc, attn_hc, ff_hc, selector, mem, attn, ff in self.layers:
            retrieved = gates = None
            if mem is not None:
                mem_in, _ = mem_hc(streams)
                if selector is not None:
                    choices = torch.stack((mem_in, *layer_points))
                    weights = rearrange(selector(mem_in), "b n (v l) -> v b n l", v=3).softmax(dim=-1)
                    mem_in = einsum(choices, weights, "l b n d, v b n l -> v b n d")
                mem_state = next(mem_caches, None)
                retrieved, state = mem(
                    mem_in, state=mem_state, prev_weights=prev_updates, prev_weights_first_row=prev_first_row
                )
                if self.neural_mem_weight_residual:
                    prev_updates = state.updates
                    prev_first_row = (
                        mem_state.seq_index if mem_state is not None else 0
                    ) // mem.store_chunk_size
                next_mem.append(state)
                if self.gate_attn_output:
                    gates = retrieved.sigmoid()
            attn_in, add = attn_hc(streams)
            out, (values, kv) = attn(
                attn_in,
                memory=retrieved,
                value_residual=value_residual,
                disable_flex_attn=disable_flex_attn,
                output_gating=gates,
                cache=next(kv_caches, None),
            )
            value_residual = values if value_residual is None else value_residual
            next_kv.append(kv)
            streams = add(out)
            ff_in, add = ff_hc(streams)
            ff_out = ff(ff_in)
            streams = add(ff_out)
            layer_points += [attn_in, out, ff_in, ff_out]
        logits = self.to_logits(self.norm(streams.sum(0)))
        if return_loss:
            return F.cross_entropy(rearrange(logits, "b n v -> b v n"), labels)
        if return_cache:
            return logits, MACCache(start + x.shape[1], next_kv, next_mem)
        return logits

    @torch.no_grad()
    def sample(
        self,
        prompt: Tensor,
        seq_len: int,
        temperature: float = 1.5,
        filter_fn: Callable = min_p_filter,
        filter_kwargs: dict | None = None,
        show_progress: bool = True,
        use_cache: bool = False,
        min_p: float | None = None,
    ) -> Tensor:
        """Continue ``prompt`` [b, p] to ``seq_len`` tokens; returns the new tokens [b, seq_len - p].

        Cached and uncached sampling draw the same random numbers and give the same tokens.
        """
        was_training = self.training
        self.eval()
        filter_kwargs = dict(filter_kwargs if filter_kwargs is not None else {"min_p": 0.1})
        if min_p is not None:
            filter_kwargs["min_p"] = min_p
        out, cache = prompt.clone(), None
        with tqdm.tqdm(total=max(0, seq_len - prompt.shape[-1]), disable=not show_progress) as bar:
            while out.shape[-1] < seq_len:
                logits, next_cache = self.forward(out, disable_flex_attn=True, cache=cache, return_cache=True)
                if use_cache:
                    cache = next_cache
                token = gumbel_sample(filter_fn(logits[:, -1], **filter_kwargs), temperature=temperature)
                out = torch.cat((out, token), dim=-1)
                bar.update(1)
        self.train(was_training)
        return out[..., prompt.shape[-1] :]


__all__ = [
    "flex_attention",
    "MACCache",
    "MemoryAsContextTransformer",
    "SegmentedAttention",
    "flex_attention_available",
    "gumbel_sample",
    "min_p_filter",
]
