"""Depthwise causal 1-D convolution + SiLU (Mamba's short conv): causal_conv1d on CUDA, else F.conv1d."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seqmem_shared.backends import optional_import, resolve_backend


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = "silu") -> torch.Tensor:
    """x [B, D, L], weight [D, W], bias [D] -> [B, D, L]; output t sees inputs t-W+1..t."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", backend: str = "auto") -> torch.Tensor:
    """Same as :func:`causal_conv1d_reference`; ``backend`` in "auto" | "torch" | "causal_conv1d"."""
    if resolve_backend(backend, x, fast="causal_conv1d") == "causal_conv1d":
        module = optional_import("causal_conv1d", "the Mamba short convolution")
        if module is not None:
            return module.causal_conv1d_fn(x.contiguous(), weight, bias, activation=activation)
        if backend == "causal_conv1d":
            raise RuntimeError("backend='causal_conv1d' requested but causal_conv1d cannot be imported")
    return causal_conv1d_reference(x, weight, bias, activation)
