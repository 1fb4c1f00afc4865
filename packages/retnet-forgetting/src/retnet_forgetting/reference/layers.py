"""Building blocks of fla's RetNet in plain PyTorch: rotary embedding, gated RMSNorm, GLU MLP, retention.

Module and parameter names follow fla (``q_proj``, ``g_norm_swish_gate``, ``gate_proj`` ...), so fla
checkpoints load unchanged. :func:`retention_qkv` and :func:`retention_output` only use attributes that
fla's ``MultiScaleRetention`` has too, so they also drive fla's modules (see ``extraction``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from seqmem_shared.kernels.rms_norm import RMSNorm, rms_norm
from torch import nn

from retnet_forgetting.ops.retention import retention
from retnet_forgetting.reference.configuration import RetNetConfig


class RotaryEmbedding(nn.Module):
    """Non-interleaved (GPT-NeoX) rotary embedding over the first ``dim`` features, base 10000, as fla's."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, float(base)
        # always a real (CPU) tensor, also when the model is built on the meta device
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., T, H, D]`` by angles ``positions [..., T] * inv_freq`` (negative undoes it)."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)  # [..., T, D/2]
        cos = freqs.cos().to(x.dtype).float()[..., None, :]
        sin = freqs.sin().to(x.dtype).float()[..., None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, seqlen_offset: int = 0,
                max_seqlen: int | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        """``q, k: [B, T, H, D]`` rotated for positions ``seqlen_offset .. seqlen_offset + T - 1``."""
        pos = torch.arange(q.shape[1], device=q.device) + seqlen_offset
        return self.rotate(q, pos), self.rotate(k, pos)


class RMSNormSwishGate(nn.Module):
    """``rmsnorm(x) * weight * swish(g)`` in fp32 over the last dim (fla's ``FusedRMSNormGated``)."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x.float(), None if self.weight is None else self.weight.float(), eps=self.eps)
        return (y * F.silu(g.float())).to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with fla's intermediate size rule.

    Old fla checkpoints fused gate and up into one ``gate_proj`` of ``2 * intermediate`` rows; they are
    split on load.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self._register_load_state_dict_pre_hook(self._split_fused_gate)

    def _split_fused_gate(self, state_dict: dict, prefix: str, *args: object) -> None:
        w = state_dict.get(prefix + "gate_proj.weight")
        fused = w is not None and w.shape[0] == 2 * self.up_proj.out_features
        if fused and prefix + "up_proj.weight" not in state_dict:
            state_dict[prefix + "gate_proj.weight"], state_dict[prefix + "up_proj.weight"] = w.chunk(2, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MultiScaleRetention(nn.Module):
    """RetNet's token mixer as in fla: q/k/v projections, RoPE on q and k, retention with per-head decay
    ``1 - 2^(-5-h)``, per-head RMSNorm with swish gate from ``g_proj``, ``o_proj``. No short convolution.
    """

    def __init__(self, config: RetNetConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.mode = {"fused_chunk": "chunk", "fused_recurrent": "recurrent"}.get(c.attn_mode, c.attn_mode)
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.key_dim, self.value_dim = c.key_dim, c.value_dim
        self.head_k_dim, self.head_v_dim = c.head_k_dim, c.head_v_dim
        self.use_short_conv = False
        self.feature_map_fn = None
        self.use_output_gate = c.use_output_gate
        self.q_proj = nn.Linear(c.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.key_dim // self.num_kv_groups, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.value_dim // self.num_kv_groups, bias=False)
        if self.use_output_gate:
            self.g_proj = nn.Linear(c.hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, c.hidden_size, bias=False)
        self.fuse_norm_and_gate = c.fuse_norm and self.use_output_gate
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = RMSNormSwishGate(self.head_v_dim, bool(c.elementwise_affine), c.norm_eps)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, eps=c.norm_eps,
                                  elementwise_affine=bool(c.elementwise_affine))
            self.gate_fn = F.silu
        self.rotary = RotaryEmbedding(self.head_k_dim)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, seqlen_offset: int = 0, backend: str = "auto",
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, T, D]`` -> (``[B, T, D]``, final state ``[B, H, Dk, Dv]`` fp32 or None)."""
        q, k, v = retention_qkv(self, x, seqlen_offset)
        mode = self.mode
        if mode == "parallel" and (initial_state is not None or output_final_state):
            mode = "chunk"
        o, state = retention(q, k, v, mode=mode, initial_state=initial_state,
                             output_final_state=output_final_state, backend=backend)
        return retention_output(self, o, x), state


def retention_qkv(attn: nn.Module, x: torch.Tensor, seqlen_offset: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotated) ``[B, T, H, Dk]`` and v ``[B, T, H, Dv]`` of a RetNet attention (ours or fla's)."""
    if getattr(attn, "use_short_conv", False):
        raise ValueError("attn.use_short_conv=True: expected False (RetNet without short convolutions)")
    q = rearrange(attn.q_proj(x), "... (h d) -> ... h d", d=attn.head_k_dim)
    k = rearrange(attn.k_proj(x), "... (h d) -> ... h d", d=attn.head_k_dim)
    if getattr(attn, "feature_map_fn", None) is not None:
        q, k = attn.feature_map_fn(q), attn.feature_map_fn(k)
    q, k = attn.rotary(q, k, seqlen_offset=seqlen_offset, max_seqlen=x.shape[1] + seqlen_offset)
    v = rearrange(attn.v_proj(x), "... (h d) -> ... h d", d=attn.head_v_dim)
    if attn.num_kv_groups > 1:
        k = repeat(k, "... h d -> ... (h g) d", g=attn.num_kv_groups)
        v = repeat(v, "... h d -> ... (h g) d", g=attn.num_kv_groups)
    return q, k, v


def retention_output(attn: nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gate, normalize and project the retention output ``o [B, T, H, Dv]`` of input ``x``: ``[B, T, D]``."""
    if attn.use_output_gate:
        g = attn.g_proj(x)
        if attn.fuse_norm_and_gate:
            g = rearrange(g, "... (h d) -> ... h d", d=attn.head_v_dim)
            o = rearrange(attn.g_norm_swish_gate(o, g), "... h d -> ... (h d)")
        else:
            o = rearrange(attn.g_norm(o), "... h d -> ... (h d)").to(g.dtype) * attn.gate_fn(g)
    else:
        o = rearrange(attn.g_norm(o), "... h d -> ... (h d)")
    return attn.o_proj(o.to(attn.o_proj.weight.dtype))
