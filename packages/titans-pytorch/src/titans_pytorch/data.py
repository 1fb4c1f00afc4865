"""Byte-level enwik8 convention: the first 90M bytes train, the next 5M validate; random crops.

Any local file works (``.gz`` is decompressed); a file shorter than 95M bytes is split in the same
90 : 5 proportion.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ENWIK8_TRAIN_BYTES = 90_000_000
ENWIK8_VAL_BYTES = 5_000_000


def load_byte_splits(
    path: str | Path, train_bytes: int = ENWIK8_TRAIN_BYTES, val_bytes: int = ENWIK8_VAL_BYTES
) -> tuple[Tensor, Tensor]:
    """(train, val) uint8 tensors from the first ``train_bytes + val_bytes`` bytes of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data_path: {path} is not a file (expected enwik8, enwik8.gz or any text file)"
        )
    total = train_bytes + val_bytes
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read(total)
    if len(raw) < total:
        train_bytes = len(raw) * train_bytes // total
    data = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
    train, val = data[:train_bytes], data[train_bytes:]
    if len(val) < 2 or len(train) < 2:
        raise ValueError(f"data_path: {path} has {len(raw)} bytes; too few for a train/val split")
    return train, val


class RandomCrops:
    """Batches of random ``seq_len + 1`` byte crops, deterministic in the batch index (exact resume).

    ``crops(index) -> LongTensor [batch_size, seq_len + 1]``.
    """

    def __init__(self, data: Tensor, seq_len: int, batch_size: int, seed: int = 0,
                 device: torch.device | str | None = None):
        if len(data) <= seq_len + 1:
            raise ValueError(f"seq_len: {seq_len} needs more than {len(data)} bytes of data")
        self.data, self.seq_len, self.batch_size, self.seed, self.device = (
            data,
            seq_len,
            batch_size,
            seed,
            device,
        )

    def __call__(self, index: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=g)
        crops = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return crops.to(self.device) if self.device else crops


def decode_bytes(ids: Tensor) -> str:
    """Printable text of byte ids (control bytes shown as spaces)."""
    return "".join(chr(max(32, int(t))) for t in ids)
