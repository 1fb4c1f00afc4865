"""Mamba-2 (fla ``Mamba2ForCausalLM``, mixer ``Mamba2``; the same parameters as mamba_ssm / HF Mamba-2).

Per head ``h``, with one scalar decay per token::

    S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),   dt_t = clamp(softplus(dt_raw_t + dt_bias), dt_limit)

``A_h = -exp(A_log_h)``; ``x`` (``headdim`` per head), ``B`` (``d_state`` per group, shared by the heads of
a group) come out of the causal conv1d over ``xBC``. In key-value terms k = B, v = dt x, so the extractor's
``[H, d_state, headdim]`` is the transpose of the model's own ``ssm_state [H, headdim, d_state]``
(``layout="native"`` returns the latter). The ``D x`` skip and the ``z`` gate act on the output only.
The conv1d state (the last ``conv_kernel`` inputs ``xBC``, ``[conv_dim, W]`` as in fla's cache) is
separate: ``extract_conv_states_at_positions`` (name ``"xBC"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from retnet_forgetting.extractors.base import StateExtractor, StateInputs, causal_conv, mixers_at
from retnet_forgetting.extractors.reference import GatedRMSNorm, ReferenceLM, ReferenceMixer


def mamba2_state_inputs(mixer: nn.Module, x: torch.Tensor) -> StateInputs:
    """``k = B [B, T, H, N]``, ``v = dt x [B, T, H, P]``, ``log_a = dt A [B, T, H, 1]`` (q = C) of a Mamba-2
    mixer."""
    H, P, N, G = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    I = mixer.intermediate_size  # noqa: E741
    proj = mixer.in_proj(x)
    d_mlp = (proj.shape[-1] - 2 * I - 2 * G * N - H) // 2
    _, _, _gate, xBC, dt = proj.split([d_mlp, d_mlp, I, mixer.conv_dim, H], dim=-1)
    act = mixer.activation if mixer.activation in ("silu", "swish") else None
    conv = causal_conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias, act)
    if act is None:
        conv = mixer.act(conv)
    xs, Bm, Cm = conv.split([I, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    lo, hi = mixer.dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(lo, hi)
    A = -torch.exp(mixer.A_log.float())
    k = repeat(Bm, "... (g n) -> ... (g r) n", g=G, r=H // G)
    q = repeat(Cm, "... (g n) -> ... (g r) n", g=G, r=H // G)
    v = rearrange(xs, "... (h p) -> ... h p", p=P).float() * dt[..., None]
    return StateInputs(k=k, v=v, log_a=(dt * A)[..., None], q=q, scale=1.0, conv={"xBC": xBC},
                       conv_width=mixer.conv_kernel_size)


class Mamba2StateExtractor(StateExtractor):
    """States ``[B, (K,) H, d_state, headdim]`` of fla's ``Mamba2ForCausalLM`` or
    :func:`mamba2_reference_model`
    (``layout="native"``: ``[..., H, headdim, d_state]``)."""

    family = "Mamba-2"
    hook_module = "mixer"
    native_v_first = True

    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        return mixers_at(model, ("backbone",), "mixer", ("Mamba2", "Mamba2Layer"), cls.family)

    def state_inputs(self, mixer: nn.Module, x: torch.Tensor) -> StateInputs:
        return mamba2_state_inputs(mixer, x)


class Mamba2Layer(ReferenceMixer):
    """Reference Mamba-2 mixer (fla/HF parameter names; gated RMSNorm after the gate, D per head)."""

    native_v_first = True
    inputs_fn = mamba2_state_inputs

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int = 16, state_size: int = 16,
                 n_groups: int = 1, conv_kernel: int = 4, expand: int = 2, mode: str = "chunk"):
        super().__init__()
        self.intermediate_size = expand * hidden_size
        if num_heads * head_dim != self.intermediate_size:
            raise ValueError(f"num_heads * head_dim = {num_heads * head_dim}: expected expand * hidden_size "
                             f"= {self.intermediate_size}")
        self.num_heads, self.head_dim, self.n_groups = num_heads, head_dim, n_groups
        self.ssm_state_size = state_size
        self.conv_kernel_size, self.mode = conv_kernel, mode
        self.activation, self.act, self.dt_limit = "silu", F.silu, (0.0, math.inf)
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                padding=conv_kernel - 1)
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=False)

    def output(self, o: torch.Tensor, x: torch.Tensor, inputs: StateInputs) -> torch.Tensor:
        I = self.intermediate_size  # noqa: E741
        gate = self.in_proj(x)[..., :I]
        xs = causal_conv(inputs.conv["xBC"], self.conv1d.weight, self.conv1d.bias, "silu")[..., :I]
        y = o + self.D[:, None] * rearrange(xs, "... (h p) -> ... h p", p=self.head_dim)
        return self.out_proj(self.norm(rearrange(y, "... h p -> ... (h p)"), gate))


def mamba2_reference_model(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                           **layer_kwargs: object) -> ReferenceLM:
    """A tiny Mamba-2 language model (``backbone.layers[i].mixer`` are :class:`Mamba2Layer`)."""
    return ReferenceLM(lambda _i: Mamba2Layer(hidden_size, **layer_kwargs), vocab_size, hidden_size,
                       num_layers,
                       decoder_name="backbone", mixer_name="mixer", norm_name="norm", mlp=False,
                       final_norm_name="norm_f")
