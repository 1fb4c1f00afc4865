"""DeltaNet and Gated DeltaNet (fla ``DeltaNetForCausalLM`` / ``GatedDeltaNetForCausalLM``).

The delta rule is not a sum of decayed outer products of the inputs::

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t          (DeltaNet: a_t = 1)

but with the pseudo-values ``u_t = beta_t (v_t - a_t k_t S_{t-1})`` it is ``S_t = a_t S_{t-1} + k_t^T u_t``;
inside each chunk the ``u`` solve a unit lower-triangular system (UT/WY form,
:func:`retnet_forgetting.extractors.scan.delta_chunk_scan`), chunk by chunk from the chunk-entry state, so
the state at any position again costs the chunk-entry state plus at most one chunk of rank-one terms.
Exact (fp32), one pass, no sequential scan over tokens.

Per fla's layers: k (and q) are L2-normalized (``qk_norm="l2"``, in fla's kernel) or sum-normalized;
DeltaNet applies ``qk_activation`` (SiLU inside the short convolutions); ``beta = sigmoid(b_proj(x))``
(ones without ``use_beta``), doubled with ``allow_neg_eigval``. Gated DeltaNet: SiLU convolutions,
``log a_t = -exp(A_log) * softplus(a_proj(x_t) + dt_bias)`` and, with ``num_v_heads > num_heads`` (GVA),
each group of value heads shares one key head; states have ``num_v_heads`` heads. fla's cache keeps
``[H, Dk, Dv]`` for DeltaNet and ``[H, Dv, Dk]`` for Gated DeltaNet. The short-convolution states are
separate (``extract_conv_states_at_positions``: ``"q"``, ``"k"``, ``"v"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from retnet_forgetting.extractors.base import StateExtractor, StateInputs, causal_conv, mixers_at
from retnet_forgetting.extractors.reference import GatedRMSNorm, ReferenceLM, ReferenceMixer, ShortConvolution


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _qkv(mixer: nn.Module, x: torch.Tensor, qk_activation: str = "silu",
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    q, k, v = mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)
    conv = {}
    if mixer.use_short_conv:
        conv = {"q": q, "k": k, "v": v}
        q, k, v = (causal_conv(t, c.weight, c.bias, c.activation)
                   for t, c in ((q, mixer.q_conv1d), (k, mixer.k_conv1d), (v, mixer.v_conv1d)))
    else:
        if qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(v)
    q, k = (rearrange(t, "... (h d) -> ... h d", d=mixer.head_k_dim) for t in (q, k))
    return q, k, rearrange(v, "... (h d) -> ... h d", d=mixer.head_v_dim), conv


def delta_net_state_inputs(mixer: nn.Module, x: torch.Tensor) -> StateInputs:
    """``k [B, T, H, Dk]`` (normalized), ``v [B, T, H, Dv]``, ``beta [B, T, H]`` of a DeltaNet layer."""
    q, k, v, conv = _qkv(mixer, x, mixer.qk_activation)
    if mixer.qk_activation == "relu":
        q, k = q.relu(), k.relu()
    elif mixer.qk_activation == "elu":
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    elif mixer.qk_activation not in ("silu", "identity"):
        raise ValueError(f"qk_activation={mixer.qk_activation!r}: expected 'silu', 'relu', 'elu' or "
                         f"'identity'")
    if mixer.qk_norm == "l2":
        q, k = _l2norm(q), _l2norm(k)
    elif mixer.qk_norm == "sum":
        q, k = (F.normalize(t.float(), p=1, dim=-1, eps=1e-6) for t in (q, k))
    else:
        raise ValueError(f"qk_norm={mixer.qk_norm!r}: expected 'l2' or 'sum'")
    ones = k.new_ones(k.shape[:3], dtype=torch.float32)
    beta = mixer.b_proj(x).float().sigmoid() if mixer.use_beta else ones
    if mixer.allow_neg_eigval:
        beta = beta * 2.0
    return StateInputs(k=k, v=v, log_a=None, beta=beta, q=q, scale=mixer.head_k_dim ** -0.5, conv=conv,
                       conv_width=mixer.conv_size if mixer.use_short_conv else 0)


def gated_delta_net_state_inputs(mixer: nn.Module, x: torch.Tensor) -> StateInputs:
    """``k [B, T, HV, Dk]``, ``v [B, T, HV, Dv]``, ``beta [B, T, HV]``, ``log_a [B, T, HV, 1]`` of a Gated
    DeltaNet layer (``HV = num_v_heads``)."""
    q, k, v, conv = _qkv(mixer, x)
    q, k = _l2norm(q), _l2norm(k)
    group = v.shape[2] // k.shape[2]
    if group > 1:  # GVA: value head i reads key head i // group
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    beta = mixer.b_proj(x).float().sigmoid() * (2.0 if mixer.allow_neg_eigval else 1.0)
    log_a = -mixer.A_log.float().exp() * F.softplus(mixer.a_proj(x).float() + mixer.dt_bias.float())
    return StateInputs(k=k, v=v, log_a=log_a[..., None], beta=beta, q=q, scale=mixer.head_k_dim ** -0.5,
                       conv=conv, conv_width=mixer.conv_size if mixer.use_short_conv else 0)


class DeltaNetStateExtractor(StateExtractor):
    """States ``[B, (K,) H, Dk, Dv]`` of fla's ``DeltaNetForCausalLM`` or
    :func:`delta_net_reference_model`."""

    family = "DeltaNet"
    hook_module = "attn"
    native_v_first = False

    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        return mixers_at(model, ("model",), "attn", ("DeltaNet", "DeltaNetLayer"), cls.family)

    def state_inputs(self, mixer: nn.Module, x: torch.Tensor) -> StateInputs:
        return delta_net_state_inputs(mixer, x)


class GatedDeltaNetStateExtractor(StateExtractor):
    """States ``[B, (K,) HV, Dk, Dv]`` of fla's ``GatedDeltaNetForCausalLM`` or
    :func:`gated_delta_net_reference_model`."""

    family = "Gated DeltaNet"
    hook_module = "attn"
    native_v_first = True

    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        return mixers_at(model, ("model",), "attn", ("GatedDeltaNet", "GatedDeltaNetLayer"), cls.family)

    def state_inputs(self, mixer: nn.Module, x: torch.Tensor) -> StateInputs:
        return gated_delta_net_state_inputs(mixer, x)


class _DeltaLayerBase(ReferenceMixer):
    def _build(self, hidden_size: int, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
               use_short_conv: bool, conv_size: int, allow_neg_eigval: bool, mode: str) -> None:
        self.num_heads, self.head_k_dim, self.head_v_dim, self.mode = num_heads, head_k_dim, head_v_dim, mode
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.allow_neg_eigval = allow_neg_eigval
        key_dim, value_dim = num_heads * head_k_dim, num_v_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size)
            self.k_conv1d = ShortConvolution(key_dim, conv_size)
            self.v_conv1d = ShortConvolution(value_dim, conv_size)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def output(self, o: torch.Tensor, x: torch.Tensor, inputs: StateInputs) -> torch.Tensor:
        g = rearrange(self.g_proj(x), "... (h d) -> ... h d", d=self.head_v_dim)
        return self.o_proj(rearrange(self.o_norm(o, g), "... h d -> ... (h d)"))


class DeltaNetLayer(_DeltaLayerBase):
    """Reference DeltaNet mixer (fla parameter names; output gate ``use_gate=True``)."""

    inputs_fn = delta_net_state_inputs

    def __init__(self, hidden_size: int, num_heads: int = 4, expand_k: float = 1.0, expand_v: float = 1.0,
                 use_beta: bool = True, use_short_conv: bool = True, conv_size: int = 4,
                 allow_neg_eigval: bool = False, qk_activation: str = "silu", qk_norm: str = "l2",
                 mode: str = "chunk"):
        super().__init__()
        self.use_beta, self.qk_activation, self.qk_norm = use_beta, qk_activation, qk_norm
        self._build(hidden_size, num_heads, num_heads, int(hidden_size * expand_k) // num_heads,
                    int(hidden_size * expand_v) // num_heads, use_short_conv, conv_size, allow_neg_eigval,
                    mode)
        if use_short_conv and qk_activation != "silu":  # as fla: q/k convolutions without activation
            self.q_conv1d.activation = self.k_conv1d.activation = None


class GatedDeltaNetLayer(_DeltaLayerBase):
    """Reference Gated DeltaNet mixer (fla parameter names, GVA with ``num_v_heads``)."""

    native_v_first = True
    inputs_fn = gated_delta_net_state_inputs

    def __init__(self, hidden_size: int, num_heads: int = 2, head_dim: int = 16, expand_v: float = 2.0,
                 num_v_heads: int | None = None, use_short_conv: bool = True, conv_size: int = 4,
                 allow_neg_eigval: bool = False, mode: str = "chunk"):
        super().__init__()
        num_v_heads = num_v_heads or num_heads
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads}: expected a multiple of num_heads={num_heads}")
        self._build(hidden_size, num_heads, num_v_heads, head_dim, int(head_dim * expand_v), use_short_conv,
                    conv_size, allow_neg_eigval, mode)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_v_heads).uniform_(1, 16)))
        dt = torch.exp(torch.rand(num_v_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))


def delta_net_reference_model(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                              **layer_kwargs: object) -> ReferenceLM:
    """A tiny DeltaNet language model (``model.layers[i].attn`` are :class:`DeltaNetLayer`)."""
    return ReferenceLM(lambda _i: DeltaNetLayer(hidden_size, **layer_kwargs), vocab_size, hidden_size,
                       num_layers)


def gated_delta_net_reference_model(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                                    **layer_kwargs: object) -> ReferenceLM:
    """A tiny Gated DeltaNet language model (``model.layers[i].attn`` are :class:`GatedDeltaNetLayer`)."""
    return ReferenceLM(lambda _i: GatedDeltaNetLayer(hidden_size, **layer_kwargs), vocab_size, hidden_size,
                       num_layers)
