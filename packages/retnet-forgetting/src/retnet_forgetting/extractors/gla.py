"""Gated Linear Attention (fla ``GLAForCausalLM``, layer ``GatedLinearAttention``).

State update per head, with a data-dependent decay on each key channel::

    S_t = diag(a_t) S_{t-1} + k_t^T v_t
    log a_t = max(logsigmoid(gk_proj(x_t)) / gate_logit_normalizer, clamp_min)

``k``, ``v`` are the projections after the optional short convolutions (SiLU) and the optional feature map
(applied to q and k); the ``1/sqrt(Dk)`` scale sits on q only, so the state is unscaled. With
``num_kv_heads < num_heads``, k, v and the gate are repeated per query head as fla does, so the state has
``num_heads`` heads. fla's cache stores ``[H, Dv, Dk]`` (``state_v_first``); the short-convolution states
(q, k and v) are NOT part of the matrix state: get them with ``extract_conv_states_at_positions``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from retnet_forgetting.extractors.base import StateExtractor, StateInputs, causal_conv, mixers_at
from retnet_forgetting.extractors.reference import GatedRMSNorm, ReferenceLM, ReferenceMixer, ShortConvolution

_FEATURE_MAPS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "sigmoid": torch.sigmoid,
                 "elu_p1": lambda x: F.elu(x) + 1.0}


def gla_state_inputs(mixer: nn.Module, x: torch.Tensor) -> StateInputs:
    """``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``log_a [B, T, H, Dk]`` (and q) of a GLA layer."""
    conv = {}
    q, k, v = mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)
    if mixer.use_short_conv:
        conv = {"q": q, "k": k, "v": v}
        q, k, v = (causal_conv(t, c.weight, c.bias, c.activation)
                   for t, c in ((q, mixer.q_conv1d), (k, mixer.k_conv1d), (v, mixer.v_conv1d)))
    gk = mixer.gk_proj(x)
    Dk, Dv, groups = mixer.head_k_dim, mixer.head_v_dim, mixer.num_kv_groups
    q = rearrange(q, "... (h d) -> ... h d", d=Dk)
    if groups > 1:
        k, gk = (repeat(t, "... (h d) -> ... (h g) d", g=groups, d=Dk) for t in (k, gk))
        v = repeat(v, "... (h d) -> ... (h g) d", g=groups, d=Dv)
    else:
        k, gk = (rearrange(t, "... (h d) -> ... h d", d=Dk) for t in (k, gk))
        v = rearrange(v, "... (h d) -> ... h d", d=Dv)
    log_a = F.logsigmoid(gk.float()) / mixer.gate_logit_normalizer
    if mixer.clamp_min is not None:
        log_a = log_a.clamp_min(mixer.clamp_min)
    fmap = mixer.feature_map_fn
    if fmap is not None:
        q, k = fmap(q), fmap(k)
    return StateInputs(k=k, v=v, log_a=log_a, q=q, scale=Dk ** -0.5, conv=conv,
                       conv_width=mixer.conv_size if mixer.use_short_conv else 0)


class GLAStateExtractor(StateExtractor):
    """States ``[B, (K,) H, Dk, Dv]`` of fla's ``GLAForCausalLM`` or :func:`gla_reference_model`."""

    family = "GLA"
    hook_module = "attn"
    native_v_first = True

    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        return mixers_at(model, ("model",), "attn", ("GatedLinearAttention", "GLALayer"), cls.family)

    def state_inputs(self, mixer: nn.Module, x: torch.Tensor) -> StateInputs:
        return gla_state_inputs(mixer, x)


class GLALayer(ReferenceMixer):
    """Reference GLA mixer (fla parameter names; fused norm + swish output gate, no GQA)."""

    native_v_first = True
    inputs_fn = gla_state_inputs

    def __init__(self, hidden_size: int, num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                 use_short_conv: bool = False, conv_size: int = 4, gate_logit_normalizer: int = 16,
                 gate_low_rank_dim: int = 16, clamp_min: float | None = None, feature_map: str | None = None,
                 mode: str = "chunk"):
        super().__init__()
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.num_heads, self.num_kv_groups, self.mode = num_heads, 1, mode
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        if feature_map is not None and feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}: expected None or one of {sorted(_FEATURE_MAPS)}")
        self.feature_map_fn = _FEATURE_MAPS[feature_map] if feature_map else None
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size)
            self.k_conv1d = ShortConvolution(key_dim, conv_size)
            self.v_conv1d = ShortConvolution(value_dim, conv_size)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim)

    def output(self, o: torch.Tensor, x: torch.Tensor, inputs: StateInputs) -> torch.Tensor:
        g = rearrange(self.g_proj(x), "... (h d) -> ... h d", d=self.head_v_dim)
        return self.o_proj(rearrange(self.g_norm_swish_gate(o, g), "... h d -> ... (h d)"))


def gla_reference_model(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                        **layer_kwargs: object) -> ReferenceLM:
    """A tiny GLA language model (``model.layers[i].attn`` are :class:`GLALayer`)."""
    return ReferenceLM(lambda _i: GLALayer(hidden_size, **layer_kwargs), vocab_size, hidden_size, num_layers)
