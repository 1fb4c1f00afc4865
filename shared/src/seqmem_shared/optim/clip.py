"""Gradient clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def clip_grad_norm(params_or_model: nn.Module | Iterable[torch.Tensor], max_norm: float,
                   norm_type: float = 2.0) -> float:
    """Scale gradients in place so that their total ``norm_type`` norm is at most ``max_norm``.

    Takes a module (a DDP- or ``torch.compile``-wrapped one too: its ``parameters()`` are the model's) or an
    iterable of tensors; parameters without a gradient are skipped. Returns the total norm *before*
    clipping (0.0 when no parameter has a gradient); ``max_norm=math.inf`` only measures it.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm}: expected > 0 (math.inf to only measure the norm)")
    params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm, norm_type))
