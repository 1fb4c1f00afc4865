"""Requested positions grouped by (row, chunk) on the host, for the Triton correction kernel (pure torch)."""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_GROUP = 8


class PositionGroups(NamedTuple):
    """Requested positions grouped by (row, chunk): ``order [N]`` flat indices ``b * K + j`` sorted by
    (row, position); group ``g`` is ``order[first[g] : first[g] + count[g]]`` (``count <= max_group``)."""

    order: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    max_group: int


def position_groups(positions: torch.Tensor, chunk_size: int, max_group: int = MAX_GROUP,
                    device: torch.device | str | None = None) -> PositionGroups:
    """Group ``positions [B, K]`` (a host tensor, so that no device sync is needed) for the kernel; the
    result lives on ``device`` (copied without waiting for the device)."""
    B, K = positions.shape
    flat = positions.reshape(-1).long().cpu()
    row = torch.arange(B).repeat_interleave(K)
    top = int(flat.max()) if flat.numel() else 0  # row strides that keep (row, position) keys apart
    order = torch.argsort(row * (top + 1) + flat, stable=True)
    chunk = (row * (top // chunk_size + 1) + flat // chunk_size)[order]
    n = flat.numel()
    new_chunk = torch.ones(n, dtype=torch.bool)
    new_chunk[1:] = chunk[1:] != chunk[:-1]
    chunk_start = torch.cummax(torch.where(new_chunk, torch.arange(n), 0), 0).values
    lead = (torch.arange(n) - chunk_start) % max_group == 0
    first = torch.nonzero(lead).reshape(-1)
    count = torch.diff(first, append=torch.tensor([n]))
    move = dict(device=device, non_blocking=True)
    return PositionGroups(order.to(**move), first.to(**move), count.to(**move), max_group)
