"""Learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based count of optimizer steps taken).

    Linear warmup ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (small but non-zero at
    step 0, 1 at ``warmup_steps``), then a half cosine from 1 at ``warmup_steps`` to ``min_lr_ratio`` at
    ``total_steps``, then ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """``LambdaLR`` applying :func:`warmup_cosine_factor` to every group's initial lr.

    Call ``scheduler.step()`` once after each ``optimizer.step()``; ``total_steps`` counts optimizer steps.
    """
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps={warmup_steps!r}: expected an integer >= 0")
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(f"total_steps={total_steps!r}: expected an integer >= 1")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps}: expected <= total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio}: expected 0 <= min_lr_ratio <= 1")

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)
