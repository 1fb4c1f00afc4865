"""NeuralMemory: a memory network trained at test time on ``||M(k) - v||^2`` (Titans, arXiv 2501.00663).

Shapes: b batch, h heads, n tokens, d model dim, dh head dim, u keys/values per token, c store chunk,
N chunks, bh = b * h. Storing splits the stored sequence at ``batch_size`` boundaries (where the weights
at which surprises are taken are refreshed) and each split into chunks of ``store_chunk_size``; chunk m
produces ``W_m = (1 - alpha_m) W_{m-1} + S_m`` with momentum ``S_m = eta_m S_{m-1} - grad_m``. Token g
(0-based, counted over all calls that share a state) is read with the weights after
``(g + 1) // retrieve_chunk_size * retrieve_chunk_size // store_chunk_size`` stored chunks, so the last
token of a chunk already sees its chunk.

Two engines compute the same numbers: ``reference`` (``torch.func`` per-chunk gradients, weights
materialised per chunk, any memory model) and ``dual`` (MLP memories: analytic gradients and
coefficient matrices, see :mod:`titans_pytorch.ops.mlp_memory`).
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .memory_models import MemoryMLP, ResidualNorm
from .ops.assoc_scan import AssocScan
from .ops.compiled import maybe_compiled
from .ops.mlp_memory import (
    chunk_grad_norms,
    dual_materialize,
    mlp_dual_read,
    mlp_dual_retrieve,
    mlp_store_grads,
    token_coefficients_per_factor,
)
from .ops.surprise import (
    momentum_decay_recurrence,
    newtonschulz5,
    recurrence_coefficients,
    softclamp_factor,
    softclamp_max,
)

__all__ = [
    "AssocScan",
    "NeuralMemState",
    "NeuralMemory",
    "default_adaptive_step_transform",
    "default_loss_fn",
    "mem_state_detach",
    "newtonschulz5",
    "softclamp_max",
]

NeuralMemState = namedtuple(
    "NeuralMemState", ["seq_index", "weights", "cache_store_segment", "states", "updates"]
)
NeuralMemState.__doc__ = """State carried between calls.

seq_index: tokens stored so far (a multiple of the store chunk size); weights: {name: [bh, ...]} weights
at which surprises are taken; cache_store_segment: tokens not yet filling a chunk ([b, r, d], or
[2, b, r, d] with qkv views); states: (last weights {name: [bh, ...]}, momenta {name: [o, bh, ...]} or
None); updates: {name: [bh, rows, ...]} weights at every chunk boundary of the last call (row 0 = the
weights it started from; a :class:`LazyUpdates` mapping, built only if read, under the dual engine). With a
``store_mask``, cache_store_segment is a (tokens, mask) pair."""


class LazyUpdates(Mapping):
    """``{name: [bh, rows, ...]}`` weights at every chunk boundary, built on first access.

    The dual engine never needs these tensors itself; they are materialised only if read (e.g. by a
    following memory's weight residual).
    """

    def __init__(self, build: Callable[[], dict[str, Tensor]]):
        self._build, self._value = build, None

    def _get(self) -> dict[str, Tensor]:
        if self._value is None:
            self._value, self._build = self._build(), None
        return self._value

    def __getitem__(self, key: str) -> Tensor:
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def detach(self) -> LazyUpdates:
        if self._value is not None:
            return LazyUpdates(lambda v=self._value: {k: t.detach() for k, t in v.items()})
        return LazyUpdates(lambda build=self._build: {k: t.detach() for k, t in build().items()})


def _tree_detach(x):
    if isinstance(x, (Tensor, LazyUpdates)):
        return x.detach()
    if isinstance(x, dict):
        return {k: _tree_detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_detach(v) for v in x)
    return x


def mem_state_detach(state: NeuralMemState) -> NeuralMemState:
    """The same state with every tensor detached (cuts backprop through earlier calls)."""
    if not isinstance(state, NeuralMemState):
        raise TypeError(f"mem_state_detach: expected a NeuralMemState, got {type(state).__name__}")
    return NeuralMemState(*(_tree_detach(v) for v in state))


def default_adaptive_step_transform(adaptive_step: Tensor, max_lr: float = 1e-2) -> Tensor:
    return adaptive_step.sigmoid() * max_lr


def default_loss_fn(pred: Tensor, target: Tensor) -> Tensor:
    """Associative-memory loss per token: mean squared error over the feature axis."""
    return (pred - target).pow(2).mean(dim=-1)


def _seq(*modules: nn.Module | None) -> nn.Module:
    mods = [m for m in modules if m is not None]
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


class MultiheadRMSNorm(nn.Module):
    """RMSNorm per head with a learned per-head scale ``gamma + 1``; x [b, h, n, dh]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(heads, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:]) * (self.gamma + 1.0)


class AveragePool(nn.Module):
    """Mean over each chunk: [b, N * c, d] -> [b, N, d]."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        return reduce(x, "b (n c) d -> b n d", "mean", c=chunk_size or self.chunk_size)


class AttentionPool(nn.Module):
    """Softmax-weighted pooling over each chunk (starts as the mean): [b, N * c, d] -> [b, N, d]."""

    def __init__(self, dim: int, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size
        self.to_attn_logits = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_attn_logits.weight)
        nn.init.zeros_(self.to_attn_logits.bias)

    def forward(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        x = rearrange(x, "b (n c) d -> b n c d", c=chunk_size or self.chunk_size)
        return (x * self.to_attn_logits(x).softmax(dim=-2)).sum(-2)


@dataclass
class _Segment:
    """What one stored split leaves for retrieval: rows ``first_row .. first_row + num_chunks``.

    ``rows`` (reference engine) holds materialised weights {name: [bh, N + 1, ...]}; ``dual`` holds
    the dual-form factors (see ``NeuralMemory._store_dual``).
    """

    first_row: int
    num_chunks: int
    rows: dict[str, Tensor] | None = None
    dual: dict | None = None


class NeuralMemory(nn.Module):
    """Neural long-term memory; drop-in for ``titans_pytorch.NeuralMemory`` (same keywords and defaults).

    ``forward(seq [b, n, d] | [b, d] | [3, b, n, d] with qkv views, state=None, ...)`` ->
    ``(retrieved [b, n, d], NeuralMemState)`` (plus ``(loss, lr)`` [b, h, n * u] with
    ``return_surprises``). Extra keywords of ours: ``engine`` ("auto": dual form when the memory is an
    MLP and the default loss, otherwise the reference), ``scan_backend`` for the momentum/decay scans
    ("torch", "triton" or "auto"; default "auto" with ``use_accelerated_scan`` else "torch"), ``compile``
    (dual engine: run its gradient, coefficient and read functions through ``torch.compile``; off by
    default: each new shape or dtype costs seconds of compilation for a modest gain), and
    ``forward(..., prev_weights_first_row=0)``: the stored-chunk row at which ``prev_weights`` start.
    """

    def __init__(
        self,
        dim: int,
        chunk_size: int | tuple[int, int] = 1,
        batch_size: int | None = None,
        dim_head: int | None = None,
        heads: int = 1,
        model: nn.Module | None = None,
        store_memory_loss_fn: Callable = default_loss_fn,
        adaptive_step_transform: Callable | None = None,
        default_step_transform_max_lr: float = 1.0,
        per_parameter_lr_modulation: bool = False,
        max_mem_layer_modulation: float = 1.0,
        per_head_learned_parameters: bool = True,
        attn_pool_chunks: bool = False,
        momentum: bool = True,
        momentum_order: int = 1,
        learned_momentum_combine: bool = False,
        learned_combine_include_zeroth: bool = False,
        num_kv_per_token: int = 1,
        qkv_receives_diff_views: bool = False,
        pre_rmsnorm: bool = True,
        post_rmsnorm: bool = False,
        qk_rmsnorm: bool = False,
        max_grad_norm: float | None = None,
        use_accelerated_scan: bool = False,
        activation: nn.Module | None = None,
        init_adaptive_step_bias: float | None = None,
        init_momentum_bias: float | None = None,
        init_decay_bias: float | None = None,
        accept_weight_residual: bool = False,
        spectral_norm_surprises: bool = False,
        gated_transition: bool = False,
        mem_model_norm_add_residual: bool = True,
        store_with_lookahead_value: bool = False,
        default_model_kwargs: dict | None = None,
        engine: str = "auto",
        scan_backend: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        dim_head = dim_head if dim_head is not None else dim
        if heads == 1 and dim_head != dim:
            raise ValueError(f"NeuralMemory: dim_head must equal dim ({dim}) when heads == 1, got {dim_head}")
        self.retrieve_chunk_size, self.store_chunk_size = (
            chunk_size if isinstance(chunk_size, tuple) else (chunk_size, chunk_size)
        )
        if min(self.retrieve_chunk_size, self.store_chunk_size) < 1:
            raise ValueError(f"NeuralMemory: chunk_size must be >= 1, got {chunk_size}")
        if batch_size is not None and batch_size % self.store_chunk_size:
            raise ValueError(
                f"NeuralMemory: batch_size ({batch_size}) must be a multiple of the store "
                f"chunk size ({self.store_chunk_size})"
            )
        if num_kv_per_token < 1:
            raise ValueError(f"NeuralMemory: num_kv_per_token must be >= 1, got {num_kv_per_token}")
        if attn_pool_chunks and self.store_chunk_size == 1:
            raise ValueError("NeuralMemory: attn_pool_chunks needs a store chunk size > 1")
        if learned_momentum_combine and not (momentum and momentum_order > 1):
            raise ValueError(
                "NeuralMemory: learned_momentum_combine needs momentum=True and momentum_order > 1"
            )
        if engine not in ("auto", "dual", "reference"):
            raise ValueError(f"NeuralMemory: engine={engine!r}: expected 'auto', 'dual' or 'reference'")

        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.num_kv_per_token = num_kv_per_token
        self.qkv_receives_diff_views = qkv_receives_diff_views
        self.engine = engine
        self.compile = compile
        self.use_accelerated_scan = use_accelerated_scan
        self.scan_backend = scan_backend or ("auto" if use_accelerated_scan else "torch")
        self.assoc_scan = AssocScan(use_accelerated=use_accelerated_scan)

        dim_inner = dim_head * heads
        self.retrieve_norm = nn.RMSNorm(dim) if pre_rmsnorm else nn.Identity()
        self.store_norm = nn.RMSNorm(dim) if pre_rmsnorm else nn.Identity()
        self.multihead_rmsnorm = MultiheadRMSNorm(dim_head, heads) if post_rmsnorm else nn.Identity()
        self.q_norm = MultiheadRMSNorm(dim_head, heads) if qk_rmsnorm else nn.Identity()
        self.k_norm = MultiheadRMSNorm(dim_head, heads) if qk_rmsnorm else nn.Identity()
        self.combine_heads = nn.Linear(dim_inner, dim, bias=False) if heads > 1 else nn.Identity()
        self.retrieve_gate = (
            nn.Sequential(nn.Linear(dim, heads, bias=False), Rearrange("b n h -> b h n 1"), nn.Sigmoid())
            if heads > 1
            else None
        )

        # memory model: its parameters become per-head initial weights (independent copies, not views)
        if model is None:
            kwargs = (
                default_model_kwargs
                if default_model_kwargs is not None
                else dict(depth=2, expansion_factor=4.0)
            )
            model = MemoryMLP(dim_head, **kwargs)
        if next(model.buffers(), None) is not None:
            raise ValueError("NeuralMemory: the memory model must not have buffers")
        with torch.no_grad():
            try:
                out = model(torch.randn(3, 2, dim_head))
            except Exception as exc:
                raise ValueError(
                    f"NeuralMemory: memory model cannot take a [3, 2, {dim_head}] input: {exc}"
                ) from exc
        if out.shape != (3, 2, dim_head):
            raise ValueError(
                f"NeuralMemory: memory model must map [..., {dim_head}] to the same shape, "
                f"got {tuple(out.shape)}"
            )
        if mem_model_norm_add_residual:
            model = ResidualNorm(dim=dim_head, model=model)
        # the module is only a template for functional calls: its own tensors never train
        self.memory_model = model.requires_grad_(False)
        named = dict(model.named_parameters())
        self.memory_model_parameter_names = list(named)
        self.num_memory_parameter_tensors = len(named)
        params = [p.detach().clone() for p in named.values()]
        if per_head_learned_parameters:
            params = [p.unsqueeze(0).repeat(heads, *(1,) * p.ndim).contiguous() for p in params]
        self.memory_model_parameters = nn.ParameterList([nn.Parameter(p) for p in params])
        self.init_weight_shape = [p.shape for p in params]
        self.per_head_learned_parameters = per_head_learned_parameters
        self.store_memory_loss_fn = store_memory_loss_fn

        self.to_queries = _seq(nn.Linear(dim, dim_inner, bias=False), activation)
        self.to_keys = _seq(nn.Linear(dim, dim_inner * num_kv_per_token, bias=False), activation)
        self.to_values = _seq(nn.Linear(dim, dim_inner * num_kv_per_token, bias=False), activation)
        c = self.store_chunk_size
        self.reduce_to_chunk_rep = AttentionPool(dim, c) if attn_pool_chunks else AveragePool(c)

        self.to_adaptive_step = nn.Sequential(
            nn.Linear(dim, heads * num_kv_per_token),
            Rearrange("b n (h u) -> (b h) (n u)", u=num_kv_per_token),
        )
        self.adaptive_step_transform = adaptive_step_transform or partial(
            default_adaptive_step_transform, max_lr=default_step_transform_max_lr
        )

        self.to_momentum = (
            nn.Sequential(
                nn.Linear(dim, heads * momentum_order),
                Rearrange("b n (h o) -> o (b h) n 1", o=momentum_order),
            )
            if momentum
            else None
        )
        self.momentum_order = momentum_order
        self.to_learned_momentum_combine = None
        self.learned_combine_include_zeroth = learned_combine_include_zeroth
        if learned_momentum_combine:
            n_comb = momentum_order + int(learned_combine_include_zeroth)
            self.to_learned_momentum_combine = nn.Sequential(
                nn.Linear(dim, heads * n_comb),
                Rearrange("b n (h o) -> o (b h) n", h=heads),
                nn.Softmax(dim=0),
            )
        self.to_layer_modulation = (
            nn.Sequential(
                nn.Linear(dim, heads * self.num_memory_parameter_tensors),
                Rearrange("b n (h w) -> w (b h) n", h=heads),
                nn.Sigmoid(),
            )
            if per_parameter_lr_modulation
            else None
        )
        self.max_mem_layer_modulation = max_mem_layer_modulation
        self.to_learned_weight_residual_mix = (
            nn.Sequential(nn.Linear(dim, heads), Rearrange("b n h -> b h n"), nn.Sigmoid())
            if accept_weight_residual
            else None
        )
        self.max_grad_norm = max_grad_norm
        if store_with_lookahead_value and self.store_chunk_size * num_kv_per_token < 2:
            raise ValueError(
                "NeuralMemory: store_with_lookahead_value needs chunk_size * num_kv_per_token > 1"
            )
        self.store_with_lookahead_value = store_with_lookahead_value
        self.spectral_norm_surprises = spectral_norm_surprises
        self.to_decay_factor = nn.Sequential(nn.Linear(dim, heads), Rearrange("b n h -> (b h) n 1"))
        self.transition_gate = nn.Parameter(torch.tensor(-5.0)) if gated_transition else None

        for bias, seq in (
            (init_adaptive_step_bias, self.to_adaptive_step),
            (init_momentum_bias, self.to_momentum),
            (init_decay_bias, self.to_decay_factor),
        ):
            if bias is not None and seq is not None:
                nn.init.zeros_(seq[0].weight)
                nn.init.constant_(seq[0].bias, bias)

        self._dual_layout = self._mlp_layout(model) if store_memory_loss_fn is default_loss_fn else None
        if engine == "dual" and self._dual_layout is None:
            raise ValueError(
                "NeuralMemory: engine='dual' needs a MemoryMLP memory (optionally in the default "
                "ResidualNorm) and the default store loss"
            )

    # ---------------------------------------------------------------- weights and states

    @staticmethod
    def _mlp_layout(model: nn.Module) -> tuple[bool, list[str], str | None] | None:
        """(has ResidualNorm, matrix parameter names, gamma name) when the dual form applies, else None."""
        inner, prefix, gamma = model, "", None
        if type(model) is ResidualNorm:
            inner, prefix, gamma = model.model, "model.", "norm.gamma"
        if type(inner) is not MemoryMLP:
            return None
        return gamma is not None, [f"{prefix}weights.{i}" for i in range(len(inner.weights))], gamma

    @property
    def memory_model_parameter_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.memory_model_parameter_names, self.memory_model_parameters))

    def init_weights(self, batch: int) -> dict[str, Tensor]:
        """Initial memory weights {name: [b * h, ...]}."""
        if self.per_head_learned_parameters:
            return {
                k: repeat(p, "h ... -> (b h) ...", b=batch)
                for k, p in self.memory_model_parameter_dict.items()
            }
        return {
            k: repeat(p, "... -> bh ...", bh=batch * self.heads)
            for k, p in self.memory_model_parameter_dict.items()
        }

    def init_momentum(self, batch: int) -> dict[str, Tensor]:
        """Zero momenta {name: [order, b * h, ...]}."""
        return {k: w.new_zeros(self.momentum_order, *w.shape) for k, w in self.init_weights(batch).items()}

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        seq: Tensor,
        store_seq: Tensor | None = None,
        state: NeuralMemState | None = None,
        detach_mem_state: bool = False,
        prev_weights: dict[str, Tensor] | None = None,
        store_mask: Tensor | None = None,
        return_surprises: bool = False,
        ttt_batch_size: int | None = None,
        prev_weights_first_row: int = 0,
    ):
        multi = self.qkv_receives_diff_views
        if seq.ndim == 2 or (multi and seq.ndim == 3):
            seq = seq.unsqueeze(-2)
        if multi:
            if seq.ndim != 4 or seq.shape[0] != 3:
                raise ValueError(
                    f"NeuralMemory: with qkv_receives_diff_views, seq must be [3, b, n, {self.dim}], "
                    f"got {tuple(seq.shape)}"
                )
            retrieve_seq, seq = seq[0], seq[1:]
        else:
            retrieve_seq = seq
        if retrieve_seq.shape[-1] != self.dim:
            raise ValueError(
                f"NeuralMemory: seq feature dim must be {self.dim}, got {retrieve_seq.shape[-1]}"
            )
        if (prev_weights is None) != (self.to_learned_weight_residual_mix is None):
            raise ValueError(
                "NeuralMemory: prev_weights must be given exactly when accept_weight_residual=True"
            )

        batch = retrieve_seq.shape[0]
        seq_index, weights, cache, past, _ = state if state is not None else (0, None, None, None, None)
        store_seq = store_seq if store_seq is not None else seq
        cache, cache_mask = cache if isinstance(cache, tuple) else (cache, None)
        num_cached = 0 if cache is None else cache.shape[-2]
        if store_mask is not None and tuple(store_mask.shape) != (batch, store_seq.shape[-2]):
            raise ValueError(
                f"NeuralMemory: store_mask must be [{batch}, {store_seq.shape[-2]}], "
                f"got {tuple(store_mask.shape)}"
            )
        if cache_mask is not None or (store_mask is not None and cache is not None):
            new = (
                store_mask
                if store_mask is not None
                else store_seq.new_ones(batch, store_seq.shape[-2], dtype=bool)
            )
            old = cache_mask if cache_mask is not None else new.new_ones(batch, num_cached)
            store_mask = torch.cat((old, new), dim=-1)
        if cache is not None:
            store_seq = torch.cat((cache, store_seq), dim=-2)

        if weights is None:
            weights = self.init_weights(batch)
        if past is None:
            past = (weights, self.init_momentum(batch) if self.to_momentum is not None else None)
        last_update, last_momentum = past

        use_dual = self._use_dual(prev_weights)
        gate = self.transition_gate.sigmoid() if self.transition_gate is not None else None
        batch_size = ttt_batch_size if ttt_batch_size is not None else self.batch_size
        c = self.store_chunk_size
        first_row = seq_index // c

        # split the stored tokens where the surprise weights are refreshed
        total = store_seq.shape[-2]
        sizes = [total]
        if batch_size is not None:
            first = batch_size - seq_index % batch_size
            sizes = [min(first, total)] + [batch_size] * max(0, (total - first) // batch_size)
            rest = total - sum(sizes)
            sizes = sizes + ([rest] if rest > 0 else [])
        # everything that does not depend on the memory state is computed once for all complete chunks
        n_total = total // c
        hp_all = self._store_hparams(
            store_seq[..., : n_total * c, :],
            store_mask[:, : n_total * c] if store_mask is not None else None,
            prev_weights,
            first_row - prev_weights_first_row,
        )
        segments, losses, lrs = [], [], []
        chunk0 = 0
        for size in sizes:
            n_chunks = size // c
            hp = self._slice_hparams(hp_all, chunk0, chunk0 + n_chunks, n_total)
            chunk0 += n_chunks
            store = self._store_dual if use_dual else self._store_reference
            segment, last_update, last_momentum, surprises = store(
                hp, weights, last_update, last_momentum, seq_index // c
            )
            segments.append(segment)
            losses.append(surprises[0])
            lrs.append(surprises[1])
            seq_index += n_chunks * c
            if batch_size is not None and seq_index % batch_size == 0 and n_chunks > 0:  # batch complete
                if gate is not None:
                    # the gated weights replace the boundary row: a chunk-less segment that wins the tie
                    last_update = {k: torch.lerp(weights[k], last_update[k], gate) for k in weights}
                    segments.append(self._empty_segment(seq_index // c, last_update, last_momentum, use_dual))
                weights = last_update
        kept = seq_index - first_row * c
        cache = store_seq[..., kept:, :] if kept < total else None
        if cache is not None and store_mask is not None:
            cache = (cache, store_mask[:, kept:])

        start = first_row * c + num_cached
        retrieved = self._retrieve(retrieve_seq, segments, start)
        updates = self._updates(segments)
        if updates is None:
            updates = LazyUpdates(lambda: self._updates(segments, force=True))
        next_state = NeuralMemState(seq_index, weights, cache, (last_update, last_momentum), updates)
        if detach_mem_state:
            next_state = mem_state_detach(next_state)
        if not return_surprises:
            return retrieved, next_state
        h = self.heads
        surprises = tuple(rearrange(torch.cat(t, dim=-1), "(b h) n -> b h n", h=h) for t in (losses, lrs))
        return retrieved, next_state, surprises

    def _use_dual(self, prev_weights) -> bool:
        ok = self._dual_layout is not None and prev_weights is None and not self.spectral_norm_surprises
        if self.engine == "dual" and not ok:
            raise ValueError(
                "NeuralMemory: engine='dual' cannot run with prev_weights or spectral_norm_surprises"
            )
        return ok and self.engine != "reference"

    # ---------------------------------------------------------------- storing

    def _store_hparams(self, seq: Tensor, mask: Tensor | None, prev_weights, first_row: int):
        """Keys, values, per-token lr and per-chunk gates of a stored split of N whole chunks."""
        c, u, h = self.store_chunk_size, self.num_kv_per_token, self.heads
        seq = self.store_norm(seq)
        key_seq, value_seq = (seq[0], seq[1]) if self.qkv_receives_diff_views else (seq, seq)
        n_chunks = key_seq.shape[-2] // c
        lr = self.adaptive_step_transform(self.to_adaptive_step(key_seq))  # [bh, n u]
        if mask is not None:
            lr = torch.where(repeat(mask, "b n -> (b h) (n u)", h=h, u=u), lr, 0.0)
        chunked = self.reduce_to_chunk_rep(key_seq, chunk_size=c)
        hp = dict(lr=lr, decay=self.to_decay_factor(chunked).sigmoid())
        hp["eta"] = self.to_momentum(chunked).sigmoid() if self.to_momentum is not None else None
        hp["combine"] = (
            self.to_learned_momentum_combine(chunked)
            if self.to_learned_momentum_combine is not None
            else None
        )
        hp["layer_mod"] = (
            self.to_layer_modulation(chunked) * self.max_mem_layer_modulation
            if self.to_layer_modulation is not None and n_chunks > 0
            else None
        )
        split = partial(rearrange, pattern="b n (h u d) -> (b h) (n u) d", h=h, u=u)
        keys = split(self.to_keys(key_seq))
        keys = rearrange(self.k_norm(rearrange(keys, "(b h) n d -> b h n d", h=h)), "b h n d -> (b h) n d")
        values = split(self.to_values(value_seq))
        hp["n_chunks"] = n_chunks
        if self.store_with_lookahead_value and n_chunks > 0:
            # within each chunk, key t is paired with value t + 1 (arXiv 2601.00671); the last key drops out
            def per_chunk(t: Tensor, sl: slice) -> Tensor:
                t = t.reshape(t.shape[0], n_chunks, c * u, *t.shape[2:])[:, :, sl]
                return t.reshape(t.shape[0], -1, *t.shape[3:])

            keys, values = per_chunk(keys, slice(None, -1)), per_chunk(values, slice(1, None))
            hp["lr"] = per_chunk(hp["lr"], slice(None, -1))
        hp["keys"], hp["values"] = keys, values
        if prev_weights is not None and n_chunks > 0:
            mix = rearrange(self.to_learned_weight_residual_mix(chunked), "b h n -> (b h) n")
            hp["residual"] = {
                k: w[:, first_row : first_row + n_chunks] * mix.reshape(*mix.shape, *(1,) * (w.ndim - 2))
                for k, w in prev_weights.items()
            }
        return hp

    def _recurrence(self, surprise, last_update, last_momentum, hp, spectral):
        return momentum_decay_recurrence(
            surprise,
            last_update,
            last_momentum,
            hp["decay"],
            hp["eta"],
            hp["combine"],
            self.learned_combine_include_zeroth,
            spectral,
            self.scan_backend,
        )

    @staticmethod
    def _slice_hparams(hp: dict, lo: int, hi: int, n_total: int) -> dict:
        """The store inputs of chunks lo..hi-1 out of ``n_total`` (token axes hold items per chunk)."""
        if (lo, hi) == (0, n_total):
            return hp
        per = hp["keys"].shape[1] // max(n_total, 1)
        out = dict(hp, n_chunks=hi - lo)
        for k in ("keys", "values", "lr"):
            out[k] = hp[k][:, lo * per : hi * per]
        out["decay"] = hp["decay"][:, lo:hi]
        for k in ("eta", "combine", "layer_mod"):
            if hp[k] is not None:
                out[k] = hp[k][:, :, lo:hi]
        if "residual" in hp:
            out["residual"] = {k: w[:, lo:hi] for k, w in hp["residual"].items()}
        return out

    def _dual_states(self, last_update, last_momentum) -> dict[str, Tensor]:
        """Carried states {name: [bh, S, ...]}: the last weights, then each momentum order."""
        orders = 0 if last_momentum is None else self.momentum_order
        return {
            k: torch.stack([w] + [last_momentum[k][o] for o in range(orders)], dim=1)
            for k, w in last_update.items()
        }

    def _empty_segment(self, first_row, last_update, last_momentum, use_dual) -> _Segment:
        """A segment without chunks: its one row is ``last_update``."""
        if not use_dual:
            return _Segment(first_row, 0, rows={k: w.unsqueeze(1) for k, w in last_update.items()})
        states = self._dual_states(last_update, last_momentum)
        w = next(iter(last_update.values()))
        coef = w.new_zeros(w.shape[0], 1, next(iter(states.values())).shape[1])
        coef[:, 0, 0] = 1.0
        return _Segment(first_row, 0, dual=dict(coef=coef, states=states, tokens=None))

    def _store_reference(self, hp, weights, last_update, last_momentum, first_row):
        """Per-chunk gradients with torch.func; every chunk's weights materialised."""
        keys, values, lr = hp["keys"], hp["values"], hp["lr"]
        bh, n_chunks = keys.shape[0], hp["n_chunks"]
        if n_chunks == 0:
            return (
                self._empty_segment(first_row, last_update, last_momentum, False),
                last_update,
                last_momentum,
                (lr, lr),
            )
        at = {k: w.unsqueeze(1).expand(bh, n_chunks, *w.shape[1:]) for k, w in weights.items()}
        if "residual" in hp:
            at = {k: at[k] + hp["residual"][k] for k in at}
        at = {k: w.reshape(bh * n_chunks, *w.shape[2:]) for k, w in at.items()}

        def loss_fn(params, k, w_lr, v):
            loss = self.store_memory_loss_fn(functional_call(self.memory_model, params, (k,)), v)
            return (loss * w_lr).sum(), loss

        chunks = partial(rearrange, pattern="bh (n cu) ... -> (bh n) cu ...", n=n_chunks)
        grads, loss = vmap(grad(loss_fn, has_aux=True))(at, chunks(keys), chunks(lr), chunks(values))
        grads = {k: g.reshape(bh, n_chunks, *g.shape[1:]) for k, g in grads.items()}
        if self.max_grad_norm is not None:
            grads = {
                k: g
                * softclamp_factor(g.flatten(2).norm(dim=-1), self.max_grad_norm).reshape(
                    bh, n_chunks, *(1,) * (g.ndim - 2)
                )
                for k, g in grads.items()
            }
        if hp["layer_mod"] is not None:
            grads = {
                k: g * m.reshape(bh, n_chunks, *(1,) * (g.ndim - 2))
                for (k, g), m in zip(grads.items(), hp["layer_mod"])
            }
        rows, next_update, next_momentum = {}, {}, {} if last_momentum is not None else None
        for k, g in grads.items():
            rows[k], mom = self._recurrence(
                -g,
                last_update[k],
                None if last_momentum is None else last_momentum[k],
                hp,
                self.spectral_norm_surprises,
            )
            next_update[k] = rows[k][:, -1]
            if mom is not None:
                next_momentum[k] = mom
        return (
            _Segment(first_row, n_chunks, rows=rows),
            next_update,
            next_momentum,
            (loss.reshape(bh, -1), lr),
        )

    def _store_dual(self, hp, weights, last_update, last_momentum, first_row):
        """Dual form: per-token gradients at the split's weights, coefficient matrices for every row."""
        residual_norm, mat_names, gamma_name = self._dual_layout
        keys, values, lr = hp["keys"], hp["values"], hp["lr"]
        bh, t = keys.shape[:2]
        n_chunks = hp["n_chunks"]
        cu = t // max(n_chunks, 1)  # stored items per chunk
        orders = 0 if last_momentum is None else self.momentum_order
        names = mat_names + ([gamma_name] if residual_norm else [])
        # carried states: last weights then each momentum order, {name: [bh, S, ...]}
        states = self._dual_states(last_update, last_momentum)
        if n_chunks == 0:
            return (
                self._empty_segment(first_row, last_update, last_momentum, True),
                last_update,
                last_momentum,
                (lr, lr),
            )

        mats = [weights[k] for k in mat_names]
        inputs, deltas, gamma_grad, loss = maybe_compiled(mlp_store_grads, self.compile)(
            mats, weights[gamma_name] if residual_norm else None, keys, values
        )
        # per-chunk scale of each parameter's gradient: soft clamp, then layer modulation
        factors = {}
        grads = dict(zip(mat_names, zip(inputs, deltas)))
        if residual_norm:
            grads[gamma_name] = (gamma_grad, None)
        for k in names:
            f = None  # None: a factor of one
            if self.max_grad_norm is not None:
                f = softclamp_factor(chunk_grad_norms(*grads[k], lr, cu), self.max_grad_norm)
            if hp["layer_mod"] is not None:
                mod = hp["layer_mod"][self.memory_model_parameter_names.index(k)]
                f = mod if f is None else f * mod
            factors[k] = f
        # closed-form recurrence on a basis: columns 0..N-1 = chunk surprises, N = last weights,
        # N+1+o = momenta (in fp32 whatever the autocast dtype: products of gates shared by every weight)
        dtype = torch.promote_types(keys.dtype, torch.float32)
        as_float = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
        rows_c, mom_c = maybe_compiled(recurrence_coefficients, self.compile)(
            n_chunks,
            as_float(hp["decay"]),
            as_float(hp["eta"]),
            as_float(hp["combine"]),
            self.learned_combine_include_zeroth,
        )
        # rows_c [bh, N+1, size]: row r = sum_m rows_c[r, m] u_m + rows_c[r, N] W + sum_o rows_c[r, N+1+o] S_o
        coef = torch.cat((rows_c[..., n_chunks : n_chunks + 1], rows_c[..., n_chunks + 1 :]), dim=-1)
        tokens = dict(
            inputs=inputs,
            deltas=deltas,
            gamma_grad=gamma_grad,
            chunk_coef=rows_c[..., :n_chunks],
            lr=lr,
            factors=[factors[k] for k in names],
        )

        def materialize(row_coef: Tensor, row_state: Tensor) -> dict[str, Tensor]:
            """{name: [bh, R, ...]} weights of rows with chunk coefs [bh, R, N] and state coefs [bh, R, S]."""
            kaps = token_coefficients_per_factor(row_coef, [factors[k] for k in names], lr)
            out = {}
            for k, kap in zip(names, kaps):
                if k == gamma_name:
                    out[k] = dual_materialize(row_state, states[k], None, gamma_grad, kap)
                else:
                    i = mat_names.index(k)
                    out[k] = dual_materialize(row_state, states[k], inputs[i], deltas[i], kap)
            return out

        # end-of-split weights and momenta, materialised together and only when read (a following split
        # or the caller's next call reads them; a training forward that drops the state never does)
        end_rows = rows_c[:, -1:] if not orders else torch.cat((rows_c[:, -1:], mom_c.transpose(0, 1)), dim=1)
        end_coef = torch.cat((end_rows[..., n_chunks : n_chunks + 1], end_rows[..., n_chunks + 1 :]), dim=-1)
        ends = LazyUpdates(lambda: materialize(end_rows[..., :n_chunks], end_coef))
        next_update = LazyUpdates(lambda: {k: v[:, 0] for k, v in ends.items()})
        next_momentum = (
            LazyUpdates(lambda: {k: v[:, 1:].transpose(0, 1) for k, v in ends.items()}) if orders else None
        )
        dual = dict(coef=coef, states=states, tokens=tokens, materialize=materialize, rows_c=rows_c)
        return (
            _Segment(first_row, n_chunks, dual=dual),
            next_update,
            next_momentum,
            (loss.reshape(bh, -1), lr),
        )

    def _updates(self, segments: list[_Segment], force: bool = False) -> dict[str, Tensor] | None:
        """Weights at every row of this call ({name: [bh, rows, ...]}), later segments winning ties."""
        parts = []
        for i, s in enumerate(segments):
            last = i == len(segments) - 1
            if s.rows is not None:
                rows = s.rows
            elif force:
                d = s.dual
                if d["tokens"] is None:
                    rows = {
                        k: torch.einsum("brs,bs...->br...", d["coef"], st) for k, st in d["states"].items()
                    }
                else:
                    n = s.num_chunks
                    rows = d["materialize"](d["rows_c"][..., :n], d["coef"])
            else:
                return None
            parts.append(rows if last else {k: v[:, :-1] for k, v in rows.items()})
        return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}

    # ---------------------------------------------------------------- retrieval

    def _queries(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """(normed seq [b, n, d], queries [b, h, n, dh])."""
        seq = self.retrieve_norm(seq)
        q = rearrange(self.to_queries(seq), "b n (h d) -> b h n d", h=self.heads)
        return seq, self.q_norm(q)

    def _finish(self, values: Tensor, normed_seq: Tensor) -> Tensor:
        """[b, h, n, dh] memory outputs -> [b, n, d]."""
        values = self.multihead_rmsnorm(values)
        if self.retrieve_gate is not None:
            values = values * self.retrieve_gate(normed_seq)
        return self.combine_heads(rearrange(values, "b h n d -> b n (h d)"))

    def _rows_of(self, start: int, n: int, max_row: int, device) -> Tensor:
        """Row (stored-chunk count) used by tokens start..start+n-1, [n]."""
        cr, cs = self.retrieve_chunk_size, self.store_chunk_size
        g = torch.arange(start, start + n, device=device)
        return ((g + 1) // cr * cr // cs).clamp(max=max_row)

    def _first_token_at_row(self, row: int, start: int, n: int) -> int:
        """Index (0..n) of the first token of this call whose row is >= ``row``."""
        cr, cs = self.retrieve_chunk_size, self.store_chunk_size
        return min(max(-(-row * cs // cr) * cr - 1 - start, 0), n)

    def _retrieve(self, seq: Tensor, segments: list[_Segment], start: int) -> Tensor:
        normed, q = self._queries(seq)
        b, h, n, dh = q.shape
        q = q.reshape(b * h, n, dh)
        if all(s.dual is not None for s in segments):
            # rows grow with the token index: each segment reads a contiguous range (later segments win ties)
            max_row = segments[-1].first_row + segments[-1].num_chunks
            bounds = [self._first_token_at_row(s.first_row, start, n) for s in segments[1:]]
            outs = []
            for s, lo, hi in zip(segments, [0, *bounds], [*bounds, n]):
                if hi > lo:
                    rows = self._rows_of(start + lo, hi - lo, max_row, q.device) - s.first_row
                    outs.append(self._retrieve_dual(q[:, lo:hi], rows, s))
            out = torch.cat(outs, dim=1)
        else:
            out = self._retrieve_reference(q, start, segments)
        return self._finish(out.reshape(b, h, n, dh), normed)

    def _retrieve_dual(self, q: Tensor, rel_rows: Tensor, segment: _Segment) -> Tensor:
        residual_norm, mat_names, gamma_name = self._dual_layout
        d = segment.dual
        states = d["states"]
        if d["tokens"] is None:
            return mlp_dual_retrieve(
                q,
                residual_norm,
                d["coef"][:, rel_rows],
                [states[k] for k in mat_names],
                states.get(gamma_name),
                [q.new_zeros(q.shape[0], 0, w.shape[-2]) for w in (states[k] for k in mat_names)],
                [q.new_zeros(q.shape[0], 0, w.shape[-1]) for w in (states[k] for k in mat_names)],
                q.new_zeros(q.shape[0], 0, q.shape[-1]) if residual_norm else None,
                [q.new_zeros(q.shape[0], q.shape[1], 0)] * len(mat_names),
                q.new_zeros(q.shape[0], q.shape[1], 0) if residual_norm else None,
            )
        tok = d["tokens"]
        return maybe_compiled(mlp_dual_read, self.compile)(
            q,
            rel_rows,
            d["coef"],
            tok["chunk_coef"],
            tok["lr"],
            tok["factors"],
            [states[k] for k in mat_names],
            states.get(gamma_name),
            tok["inputs"],
            tok["deltas"],
            tok["gamma_grad"],
        )

    def _retrieve_reference(self, q: Tensor, start: int, segments: list[_Segment]) -> Tensor:
        """Blocked retrieval with materialised weights: blocks of ``retrieve_chunk_size`` query slots."""
        updates = self._updates(segments, force=True)
        return self._apply_rows(q, updates, start, segments[0].first_row)

    def _apply_rows(self, q: Tensor, updates: dict[str, Tensor], start: int, first_row: int) -> Tensor:
        """q [bh, n, dh] read with rows of ``updates`` {name: [bh, R, ...]} (row 0 = ``first_row``)."""
        cr, cs = self.retrieve_chunk_size, self.store_chunk_size
        bh, n, dh = q.shape
        num_rows = next(iter(updates.values())).shape[1]
        front = (start + 1) % cr
        total = math.ceil((front + n) / cr) * cr
        qp = F.pad(q, (0, 0, front, total - front - n))
        blocks = torch.arange(total // cr, device=q.device) + (start + 1) // cr
        rows = (blocks * cr // cs - first_row).clamp(0, num_rows - 1)
        nb = blocks.numel()
        params = {k: w[:, rows].reshape(bh * nb, *w.shape[2:]) for k, w in updates.items()}
        out = vmap(lambda p, x: functional_call(self.memory_model, p, (x,)))(
            params, qp.reshape(bh * nb, cr, dh)
        )
        return out.reshape(bh, total, dh)[:, front : front + n]

    # ---------------------------------------------------------------- titans-pytorch methods

    def retrieve_memories(self, seq: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """Read seq [b, n, d] with ``weights`` {name: [bh, ...]} (all tokens) or [bh, rows, ...] (rows as
        in ``state.updates`` of a call that started at token 0)."""
        normed, q = self._queries(seq)
        b, h, n, dh = q.shape
        if [w.shape[1:] for w in weights.values()] == [
            s[1:] if self.per_head_learned_parameters else s for s in self.init_weight_shape
        ] and all(
            w.ndim == len(s) + (0 if self.per_head_learned_parameters else 1)
            for w, s in zip(weights.values(), self.init_weight_shape)
        ):
            weights = {k: w.unsqueeze(1) for k, w in weights.items()}
        out = (
            self._apply_rows(q.reshape(b * h, n, dh), weights, 0, 0)
            if next(iter(weights.values())).shape[1] > 1
            else vmap(lambda p, x: functional_call(self.memory_model, p, (x,)))(
                {k: w[:, 0] for k, w in weights.items()}, q.reshape(b * h, n, dh)
            )
        )
        return self._finish(out.reshape(b, h, n, dh), normed)
