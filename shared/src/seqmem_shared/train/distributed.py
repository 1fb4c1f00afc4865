"""Rank-aware helpers that work the same with and without ``torchrun``.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), :func:`init_distributed` joins the
process group (NCCL on CUDA, gloo on CPU) and pins this process to ``cuda:LOCAL_RANK``. Run as a plain
script, everything degrades to a single process: rank 0 of 1, ``barrier`` is a no-op and
``all_reduce_mean`` returns its input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T", torch.Tensor, float)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and the ``device`` to use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if launched by it; idempotent; a no-op for a plain process.

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. Under torchrun
    with CUDA the current device becomes ``cuda:LOCAL_RANK``: put the model on ``DistInfo.device``.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = _local_rank()
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, _default_device(local_rank))
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _local_rank()
    device = _default_device(local_rank)
    if world_size <= 1 or "RANK" not in os.environ:
        return DistInfo(0, 1, local_rank, device)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank}: expected 0 <= RANK < WORLD_SIZE={world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: T) -> T:
    """Mean of ``value`` over ranks: a float gives a float, a tensor gives a new tensor (input untouched)."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out.item()) / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group, if any (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def ranks_finish_together() -> Iterator[None]:
    """Run the body, wait for every rank (:func:`barrier`), then :func:`cleanup`: the end of a torchrun
    script. A rank that exits while another still talks to gloo aborts it ("terminate called without an
    active exception"); if the body raises, the group is left without waiting, so no rank hangs."""
    try:
        yield
        barrier()
    finally:
        cleanup()
