"""Sharding the pipeline over ``torchrun`` ranks (NCCL on GPUs, gloo on CPU); a no-op in one process.

- Extraction: the store's pending shards are dealt out round-robin (rank ``r`` writes shards ``r, r + W,
  ...``); rank 0 creates the manifest before a barrier, every rank checks it, and a final barrier comes
  before anything reads the store. Shards are written atomically, so a killed job resumes with the
  missing ones under any number of ranks.
- Probes: the probe jobs of each kind (every (layer, head), every layer) are dealt out the same way; the
  logistic probes' early stopping is agreed across ranks (:func:`any_rank`), so every job trains for the
  same steps as in one process; :func:`gather_frames` puts the per-job tables back together on rank 0 in
  the one-process order.

Launch: ``torchrun --nproc_per_node=N -m retnet_forgetting.cli run --config X.yaml``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from seqmem_shared.train.distributed import all_gather_object, get_rank, get_world_size, is_distributed

JOB_COLUMN = "_job"


def my_jobs(num_jobs: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices of the jobs of ``rank`` (default: this process) among ``num_jobs``: ``rank, rank + W, ...``."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    return list(range(rank, num_jobs, world_size))


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is True on any rank (``flag`` itself without a process group)."""
    if not is_distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_frames(frames: list[Any]) -> Any:
    """Rank 0: one table from every rank's ``frames`` (the same sequence of probe tables on each rank, each
    holding this rank's jobs with their index in :data:`JOB_COLUMN`), rows in the one-process order (per
    table: by lag, then job); other ranks: None."""
    import pandas as pd

    per_rank = all_gather_object(frames)
    if get_rank() != 0:
        return None
    if len({len(f) for f in per_rank}) != 1:
        raise RuntimeError(f"gather_frames: ranks produced {[len(f) for f in per_rank]} tables; "
                           f"expected the same number")
    tables = []
    for parts in zip(*per_rank):
        table = pd.concat([p for p in parts if len(p)], ignore_index=True)
        tables.append(table.sort_values(["lag", JOB_COLUMN], kind="stable").drop(columns=JOB_COLUMN))
    return pd.concat(tables, ignore_index=True)
