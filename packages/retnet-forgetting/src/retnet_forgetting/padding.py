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
