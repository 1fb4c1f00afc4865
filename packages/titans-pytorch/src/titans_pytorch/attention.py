"""Segmented attention over [persistent memory || retrieved memory || segment] (Titans MAC).

Token i attends to every persistent token, and to segment token j and retrieved-memory token j when
``j <= i`` and j is in i's window: the same segment (``i // S == j // S``) or, with ``sliding``, the last
``S`` positions (``i - j < S``). On CUDA, FlexAttention runs this mask with block sparsity; elsewhere the
same mask is materialised for ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from seqmem_shared.backends import optional_import
from torch import Tensor, nn

AttnIntermediates = namedtuple("AttnIntermediates", ("value_residual", "cached_key_values"))


def mac_mask(
    q_idx: Tensor,
    kv_idx: Tensor,
    seq_len: int,
    segment_len: int,
    num_persist: int,
    has_memory: bool,
    sliding: bool,
) -> Tensor:
    """Allowed (query, key) pairs for key layout [persistent (P) | memory (n, if any) | segment (n)]."""
    j = kv_idx - num_persist
    if has_memory:
        j = torch.where(j >= seq_len, j - seq_len, j)
    if sliding:
        window = (q_idx - j) < segment_len
    else:
        window = (q_idx // segment_len) == (j // segment_len)
    return (kv_idx < num_persist) | ((j <= q_idx) & window)


@functools.cache
def _flex() -> tuple[Callable, Callable] | None:
    """(compiled flex_attention, create_block_mask) or None when this torch has no FlexAttention."""
    mod = optional_import("torch.nn.attention.flex_attention", "MAC block-sparse attention")
    if mod is None:
        return None
    return torch.compile(mod.flex_attention), mod.create_block_mask


def _flex_attention_fn() -> Callable | None:
    """The raw (uncompiled) flex_attention, or None (titans-pytorch exposes it as ``flex_attention``)."""
    mod = optional_import("torch.nn.attention.flex_attention", "MAC block-sparse attention")
    return None if mod is None else mod.flex_attention


flex_attention = _flex_attention_fn()


def flex_attention_available() -> bool:
    return torch.cuda.is_available() and _flex() is not None


@functools.lru_cache(maxsize=32)
def mac_block_mask(
    seq_len: int, segment_len: int, num_persist: int, has_memory: bool, sliding: bool, device: str
):
    """FlexAttention BlockMask for :func:`mac_mask` (cached per shape)."""
    _, create_block_mask = _flex()

    def mask_mod(b, h, q_idx, kv_idx):
        return mac_mask(q_idx, kv_idx, seq_len, segment_len, num_persist, has_memory, sliding)

    kv_len = num_persist + seq_len * (2 if has_memory else 1)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=kv_len, device=device)


@functools.lru_cache(maxsize=16)
def _rotary_table(
    start: int, n: int, dim: int, base: float, device: torch.device, dtype: torch.dtype, inference: bool
) -> tuple[Tensor, Tensor]:
    """(cos [n, dim], signed sin [n, dim]) for positions start..start+n-1, built once per shape and
    shared by every layer and step (``inference`` keys tensors made under inference mode apart)."""
    half = dim // 2
    freqs = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(start, start + n, device=device, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotary(x: Tensor, start: int, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of x [b, h, n, dh] at positions start..start+n-1 (rotate-half layout):
    ``(x1 cos - x2 sin, x2 cos + x1 sin)``."""
    n, dim = x.shape[-2:]
    cos, sin = _rotary_table(start, n, dim, base, x.device, x.dtype, torch.is_inference_mode_enabled())
    half = dim // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


class SegmentedAttention(nn.Module):
    """Windowed causal attention with persistent tokens and optional retrieved-memory tokens.

    ``forward(seq [b, n, d], memory=None [b, n, d], value_residual=None, ..., cache=None)`` ->
    ``(out [b, n, d], AttnIntermediates(values [b, h, n, dh], next_cache))``. With ``cache`` (from a
    previous call), ``seq`` holds the next tokens at positions ``cache.position ...``.
    ``num_longterm_mem_tokens`` is accepted for titans-pytorch compatibility; retrieved memory tokens
    take their role here.
    """

    def __init__(
        self,
        dim: int,
        segment_len: int,
        num_persist_mem_tokens: int = 0,
        num_longterm_mem_tokens: int = 0,
        dim_head: int = 64,
        heads: int = 8,
        sliding: bool = False,
        accept_value_residual: bool = False,
        attend_kwargs: dict | None = None,
        use_flex_attn: bool = False,
    ):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"SegmentedAttention: segment_len must be >= 1, got {segment_len}")
        if dim_head % 2:
            raise ValueError(
                f"SegmentedAttention: dim_head must be even for rotary embeddings, got {dim_head}"
            )
        self.segment_len, self.heads, self.dim_head = segment_len, heads, dim_head
        self.sliding, self.use_flex_attn = sliding, use_flex_attn
        self.num_persist_mem_tokens = num_persist_mem_tokens
        self.num_longterm_mem_tokens = num_longterm_mem_tokens
        inner = dim_head * heads
        self.norm = nn.RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.to_learned_v_mix = (
            nn.Sequential(nn.Linear(dim, heads), nn.Sigmoid()) if accept_value_residual else None
        )
        self.persistent_memory = nn.Parameter(torch.randn(2, heads, num_persist_mem_tokens, dim_head) * 0.02)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        return tuple(rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))

    def forward(
        self,
        seq: Tensor,
        memory: Tensor | None = None,
        value_residual: Tensor | None = None,
        flex_attn_fn: Callable | None = None,
        disable_flex_attn: bool = False,
        output_gating: Tensor | None = None,
        cache: tuple | None = None,
    ):
        if (value_residual is None) != (self.to_learned_v_mix is None):
            raise ValueError(
                "SegmentedAttention: value_residual must be given exactly when accept_value_residual"
            )
        b, n = seq.shape[:2]
        start = 0 if cache is None else cache[0]
        positions = torch.arange(start, start + n, device=seq.device)
        q, k, v = self._kv(seq)
        orig_v = v
        if self.to_learned_v_mix is not None:
            mix = rearrange(self.to_learned_v_mix(self.norm(seq)), "b n h -> b h n 1")
            v = torch.lerp(v, value_residual, mix)
        q, k = rotary(q, start), rotary(k, start)
        mk = mv = None
        if memory is not None:
            _, mk, mv = self._kv(memory)
            mk = rotary(mk, start)
        pk, pv = (repeat(t, "h p d -> b h p d", b=b).to(k.dtype) for t in self.persistent_memory)
        if cache is None:
            keys = torch.cat([pk] + ([mk] if mk is not None else []) + [k], dim=-2)
            values = torch.cat([pv] + ([mv] if mv is not None else []) + [v], dim=-2)
            use_flex = seq.is_cuda and self.use_flex_attn and not disable_flex_attn and _flex() is not None
            if use_flex:
                if flex_attn_fn is None:
                    block_mask = mac_block_mask(
                        n,
                        self.segment_len,
                        self.num_persist_mem_tokens,
                        memory is not None,
                        self.sliding,
                        str(seq.device),
                    )
                    flex_attn_fn = functools.partial(_flex()[0], block_mask=block_mask)
                out = flex_attn_fn(q, keys, values)
            else:
                kv_idx = torch.arange(keys.shape[-2], device=seq.device)
                mask = mac_mask(
                    positions[:, None],
                    kv_idx[None],
                    n,
                    self.segment_len,
                    self.num_persist_mem_tokens,
                    memory is not None,
                    self.sliding,
                )
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            next_cache = self._trim(start + n, positions, k, v, mk, mv)
        else:
            out, next_cache = self._decode(q, k, v, mk, mv, pk, pv, positions, cache)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if output_gating is not None:
            out = out * output_gating
        return out, AttnIntermediates(orig_v, next_cache)

    def _trim(self, next_pos: int, positions: Tensor, k, v, mk, mv) -> tuple:
        """Cache of the last ``segment_len`` positions: (next position, positions, k, v, mem k, mem v)."""
        keep = min(self.segment_len, positions.shape[0])  # positions are consecutive: slice, no sync

        def sel(t: Tensor | None) -> Tensor | None:
            return t[:, :, -keep:] if t is not None else None

        return (next_pos, positions[-keep:], sel(k), sel(v), sel(mk), sel(mv))

    def _decode(self, q, k, v, mk, mv, pk, pv, positions, cache):
        """Attention of new tokens against the cached window (explicit mask)."""
        _, old_pos, ck, cv, cmk, cmv = cache
        all_pos = torch.cat((old_pos, positions))
        k, v = torch.cat((ck, k), dim=-2), torch.cat((cv, v), dim=-2)
        if mk is not None:
            mk, mv = torch.cat((cmk, mk), dim=-2), torch.cat((cmv, mv), dim=-2)
        qp, kp = positions[:, None], all_pos[None]
        window = (
            (qp - kp) < self.segment_len
            if self.sliding
            else (qp // self.segment_len) == (kp // self.segment_len)
        )
        allowed = (kp <= qp) & window
        parts_k, parts_v = [pk], [pv]
        masks = [torch.ones(len(positions), pk.shape[-2], dtype=torch.bool, device=q.device)]
        if mk is not None:
            parts_k.append(mk)
            parts_v.append(mv)
            masks.append(allowed)
        parts_k.append(k)
        parts_v.append(v)
        masks.append(allowed)
        out = F.scaled_dot_product_attention(
            q, torch.cat(parts_k, -2), torch.cat(parts_v, -2), attn_mask=torch.cat(masks, dim=-1)
        )
        return out, self._trim(cache[0] + len(positions), all_pos, k, v, mk, mv)
