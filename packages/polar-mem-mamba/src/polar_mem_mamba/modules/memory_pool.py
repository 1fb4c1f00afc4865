"""MemoryPool: a cross-layer, per-sample top-k priority queue of token summaries, read by attention.

Writing layers add one entry per stream position: a summary (``summarizer(y)``, ``summary_dim``) and a
learned priority (``score_proj(y)``). The pool seen at position ``t`` is what a priority queue of
capacity ``pool_size`` holds after receiving, in order, every entry written at positions ``<= t``
(by any earlier or the current layer): the ``pool_size`` highest priorities among them. This keeps the
pool causal (position ``t`` never reads entries from later positions) and is computed for all
positions at once (:meth:`MemoryPoolState.visible`), without per-sample Python loops.

Reading: queries ``q_proj(x)`` attend over the visible entries with logits
``q . k_proj(s) / sqrt(summary_dim) + logsigmoid(priority)`` (so ``score_proj`` is trained through the
retrieval, not only used for selection), and the result enters through a learned sigmoid gate:
``x + sigmoid(out_gate(x)) * out_proj([x, retrieved])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MemoryPoolState:
    """Everything written so far: ``pool`` [B, N, S] summaries, ``priorities`` [B, N], ``positions`` [N].

    ``positions[n]`` is the stream position entry ``n`` was written at (the same for every sample).
    """

    pool: torch.Tensor
    priorities: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def empty(cls, batch: int, summary_dim: int, device=None, dtype=None) -> MemoryPoolState:
        return cls(torch.zeros(batch, 0, summary_dim, device=device, dtype=dtype),
                   torch.zeros(batch, 0, device=device, dtype=torch.float32),
                   torch.zeros(0, device=device, dtype=torch.long))

    def append(self, summaries: torch.Tensor, priorities: torch.Tensor) -> MemoryPoolState:
        """Add one entry per position: summaries [B, T, S], priorities [B, T] (positions 0..T-1)."""
        positions = torch.arange(summaries.shape[1], device=summaries.device)
        return MemoryPoolState(torch.cat([self.pool, summaries.to(self.pool.dtype)], dim=1),
                               torch.cat([self.priorities, priorities.float()], dim=1),
                               torch.cat([self.positions, positions]))

    def visible(self, length: int, pool_size: int) -> torch.Tensor:
        """[B, length, N] bool: entry n is in the priority queue of capacity ``pool_size`` at position t.

        That is: written at a position ``<= t`` and among the ``pool_size`` highest priorities of such
        entries (entries tied with the k-th priority are all kept).
        """
        t = torch.arange(length, device=self.positions.device)
        written = self.positions[None, :] <= t[:, None]  # [T, N]
        n = self.positions.shape[0]
        if n <= pool_size:
            return written[None].expand(self.priorities.shape[0], -1, -1)
        prio = self.priorities.detach()[:, None, :].masked_fill(~written[None], -math.inf)  # [B, T, N]
        kth = prio.topk(pool_size, dim=-1).values[..., -1:]  # [B, T, 1]
        return written[None] & (prio >= kth)

    def counts(self, length: int, pool_size: int) -> torch.Tensor:
        """[B, length]: how many entries the queue holds at each position."""
        return self.visible(length, pool_size).sum(-1)


class MemoryPool(nn.Module):
    """Learned write priority (``score_proj``), summaries, attention retrieval and ``out_gate``.

    ``write(y, state)`` -> state with one entry per position of y [B, T, d_model] (only when built with
    ``writes=True``: reading-only layers have no write weights); ``forward(x, state)`` -> x [B, T, d_model]
    after gated retrieval from the causal top-k pool.
    """

    def __init__(self, d_model: int, pool_size: int, summary_dim: int, writes: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pool_size, self.summary_dim, self.writes = pool_size, summary_dim, writes
        if writes:
            self.score_proj = nn.Linear(d_model, 1, bias=True, **factory)
            self.summarizer = nn.Linear(d_model, summary_dim, bias=False, **factory)
        self.q_proj = nn.Linear(d_model, summary_dim, bias=False, **factory)
        self.k_proj = nn.Linear(summary_dim, summary_dim, bias=False, **factory)
        self.v_proj = nn.Linear(summary_dim, d_model, bias=False, **factory)
        self.out_proj = nn.Linear(2 * d_model, d_model, bias=False, **factory)
        self.out_gate = nn.Linear(d_model, d_model, bias=True, **factory)
        nn.init.zeros_(self.out_proj.weight)  # starts as the identity; training opens the read path

    def write(self, y: torch.Tensor, state: MemoryPoolState) -> MemoryPoolState:
        if not self.writes:
            raise RuntimeError("MemoryPool.write: this pool was built with writes=False")
        return state.append(self.summarizer(y), self.score_proj(y).squeeze(-1))

    def retrieve(self, x: torch.Tensor, state: MemoryPoolState) -> torch.Tensor:
        """Attention of x [B, T, d_model] over the entries visible at each position -> [B, T, d_model]."""
        visible = state.visible(x.shape[1], self.pool_size)
        q, k, v = self.q_proj(x), self.k_proj(state.pool), self.v_proj(state.pool)
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits also under autocast
            logits = torch.einsum("bts,bns->btn", q.float(), k.float()) / math.sqrt(self.summary_dim)
        logits = logits + F.logsigmoid(state.priorities)[:, None, :]
        weights = torch.softmax(logits.masked_fill(~visible, torch.finfo(logits.dtype).min), dim=-1)
        weights = weights * visible.any(-1, keepdim=True)  # a position with an empty pool reads zeros
        return torch.einsum("btn,bnd->btd", weights.to(v.dtype), v)

    def forward(self, x: torch.Tensor, state: MemoryPoolState) -> torch.Tensor:
        retrieved = self.retrieve(x, state)
        return x + torch.sigmoid(self.out_gate(x)) * self.out_proj(torch.cat([x, retrieved], dim=-1))
