"""Padding to the right: every sequence starts at column 0, so causal models need no mask.

fla unpads with ``cu_seqlens`` and restarts positions at each sequence's first real token; moving the
real tokens of each row to the front (keeping their order) gives the same result for any mask.
"""

from __future__ import annotations

import torch


def right_align_index(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``index [B, T]``, ``lengths [B]``): ``x.gather(1, index)`` moves the real tokens to the front."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [B, T] of 0/1, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return index, mask.sum(1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, T, ...]`` reordered along T by ``index [B, T]``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def scatter_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_rows`."""
    return gather_rows(x, torch.argsort(index, dim=1))


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` as ``[B, T]`` and the mask as a CPU long tensor, or None when it has no padding."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [B, T] tensor, "
                         f"got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).long().cpu()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if (attention_mask.sum(1) == 0).any():
            raise ValueError("attention_mask: every row needs at least one real token")
        if bool(attention_mask.all()):
            attention_mask = None
    return input_ids, attention_mask


def check_positions(positions: torch.Tensor | list[int], B: int, T: int) -> torch.Tensor:
    """Requested columns ``[K]`` or ``[B, K]`` -> a checked CPU ``[B, K]`` long tensor."""
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    if positions.dim() == 1:
        positions = positions[None].expand(B, -1)
    if positions.dim() != 2 or positions.shape[0] != B:
        raise ValueError(f"positions: expected [K] or [B={B}, K], got shape {tuple(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= T):
        raise ValueError(f"positions: expected columns in [0, {T - 1}], "
                         f"got {int(positions.min())}..{int(positions.max())}")
    return positions
