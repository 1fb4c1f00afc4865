"""The training loop shared by the seqmem packages.

``Trainer(model, TrainConfig(...), loss_fn, train_data, eval_fn).fit()``: autocast, gradient
accumulation and clipping, warmup-cosine, periodic evaluation, tqdm, ``metrics.jsonl``, atomic
checkpoints with exact resume, DDP under ``torchrun``. See ``loop.py`` for the data contract.
"""

from seqmem_shared.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from seqmem_shared.train.config import TrainConfig
from seqmem_shared.train.curves import CurveComparison, compare_curves, read_metrics
from seqmem_shared.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    ranks_finish_together,
)
from seqmem_shared.train.loop import Callback, Trainer, move_to_device, seed_everything

__all__ = [
    "Callback",
    "CheckpointError",
    "CurveComparison",
    "DistInfo",
    "TrainConfig",
    "Trainer",
    "all_reduce_mean",
    "barrier",
    "capture_rng_state",
    "cleanup",
    "compare_curves",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "move_to_device",
    "ranks_finish_together",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "unwrap_model",
]
