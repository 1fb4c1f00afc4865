"""Tiny pure-PyTorch language models around the reference mixers (GLA, Mamba-2, DeltaNet, Gated DeltaNet).

They exist so that every extractor runs and is tested on CPU without fla: module and parameter names of
the mixers follow fla's layers (``q_proj``, ``gk_proj``, ``in_proj``, ``A_log``, ``q_conv1d`` ...), and the
decoder layout follows fla's models (``model.layers[i].attn`` for GLA / DeltaNet, ``backbone.layers[i].mixer``
for Mamba-2). ``model(input_ids, use_cache=True).past_key_values[l]["recurrent_state"]`` is the final state
in the model's native layout, computed token by token when the mixers' ``mode`` is ``"recurrent"`` (as
fla's fused-recurrent kernels do) and with the chunked scan otherwise. The blocks themselves (norms, a
SwiGLU MLP) are simplified: these models are not weight-compatible with fla's at the block level.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from retnet_forgetting.extractors import scan
from retnet_forgetting.extractors.base import StateInputs, causal_conv, conv_windows


class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution (fla's ``ShortConvolution`` parameters ``weight [D, 1, W]``, ``bias``)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False,
                 activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         padding=kernel_size - 1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return causal_conv(x, self.weight, self.bias, self.activation)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight * silu(g)`` on the last dim (fla's ``FusedRMSNormGated``); ``g=None``: plain."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return (y * F.silu(g.float()) if g is not None else y).to(x.dtype)


class ReferenceMixer(nn.Module):
    """Base of the reference mixers: ``state_inputs`` (shared with the extractor), the scan, ``output``."""

    mode = "chunk"
    native_v_first = False
    inputs_fn: Callable[[nn.Module, torch.Tensor], StateInputs]

    def output(self, o: torch.Tensor, x: torch.Tensor, inputs: StateInputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, use_cache: bool = False, **_: object,
                ) -> tuple[torch.Tensor, dict | None]:
        inputs = type(self).inputs_fn(self, hidden_states)
        if self.mode == "recurrent":
            o, final = scan.recurrent_scan(inputs.q, inputs.k, inputs.v, inputs.log_a, inputs.beta,
                                           inputs.scale)
        else:
            u, log_a, h, final = inputs.scan(scan.DEFAULT_CHUNK_SIZE)
            o = scan.chunk_output(inputs.q, inputs.k, u, log_a, h, inputs.scale, scan.DEFAULT_CHUNK_SIZE)
        out = self.output(o.to(hidden_states.dtype), hidden_states, inputs)
        if not use_cache:
            return out, None
        B, T = hidden_states.shape[:2]
        last = torch.full((B, 1), T - 1, device=hidden_states.device)
        conv = tuple(conv_windows(c, last, inputs.conv_width)[:, 0] for c in inputs.conv.values())
        state = final.transpose(-1, -2) if self.native_v_first else final
        return out, {"recurrent_state": state, "conv_state": conv or None}


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReferenceBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(mlp_norm(x))`` if it has an MLP."""

    def __init__(self, hidden_size: int, mixer: nn.Module, mixer_name: str, norm_name: str, mlp: bool):
        super().__init__()
        self.mixer_name, self.norm_name = mixer_name, norm_name
        setattr(self, norm_name, nn.RMSNorm(hidden_size, eps=1e-6))
        setattr(self, mixer_name, mixer)
        self.has_mlp = mlp
        if mlp:
            self.mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
            self.mlp = SwiGLU(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> tuple[torch.Tensor, dict | None]:
        o, cache = getattr(self, self.mixer_name)(getattr(self, self.norm_name)(x), use_cache=use_cache)
        x = x + o
        if self.has_mlp:
            x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class ReferenceDecoder(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, blocks: list[ReferenceBlock]):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(blocks)


class ReferenceLM(nn.Module):
    """Embeddings -> blocks -> RMSNorm -> LM head. ``forward(input_ids, use_cache=False)`` returns
    ``.logits [B, T, V]`` and ``.past_key_values`` (a list of ``{"recurrent_state", "conv_state"}`` per layer
    when ``use_cache``)."""

    def __init__(self, make_mixer: Callable[[int], nn.Module], vocab_size: int, hidden_size: int,
                 num_layers: int, decoder_name: str = "model", mixer_name: str = "attn",
                 norm_name: str = "attn_norm", mlp: bool = True, final_norm_name: str = "norm"):
        super().__init__()
        blocks = [ReferenceBlock(hidden_size, make_mixer(i), mixer_name, norm_name, mlp)
                  for i in range(num_layers)]
        self.decoder_name, self.final_norm_name = decoder_name, final_norm_name
        decoder = ReferenceDecoder(vocab_size, hidden_size, blocks)
        setattr(decoder, final_norm_name, nn.RMSNorm(hidden_size, eps=1e-6))
        setattr(self, decoder_name, decoder)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: object) -> SimpleNamespace:
        decoder = getattr(self, self.decoder_name)
        x = decoder.embeddings(input_ids)
        caches = []
        for block in decoder.layers:
            x, cache = block(x, use_cache=use_cache)
            caches.append(cache)
        logits = self.lm_head(getattr(decoder, self.final_norm_name)(x))
        return SimpleNamespace(logits=logits, past_key_values=caches if use_cache else None)
