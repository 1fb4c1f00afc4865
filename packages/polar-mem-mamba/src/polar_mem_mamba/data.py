"""MQAR batches for training and the fixed evaluation sets, from ``seqmem_shared.data.mqar``.

Training batch ``index`` (the Trainer's global micro-batch counter) uses seed
``(config.seed + 1) * 2**32 + index``; evaluation sets use seeds below ``2**32`` (``eval_seed`` for
the test set, ``eval_seed + 1`` for the validation set watched during training), so they never
coincide with a training batch.
"""

from __future__ import annotations

import torch
from seqmem_shared.data.mqar import encoder_decoder_mqar

from polar_mem_mamba.config import Config

Batch = dict[str, torch.Tensor]


def mqar_batch(config: Config, num_examples: int, seed: int, device: torch.device | str = "cpu",
               min_pairs: int | None = None) -> Batch:
    """{"encoder_ids" [B, 2N+2], "decoder_ids" [B, M+1], "targets" [B, M+1] (-100 at BOS)}; with
    ``min_pairs`` each example holds between ``min_pairs`` and N pairs (then EOS and PAD)."""
    enc, dec, tgt = encoder_decoder_mqar(config.num_pairs, config.num_queries, num_examples, seed=seed,
                                         device=device, vocab_size=config.vocab_size, min_pairs=min_pairs)
    return {"encoder_ids": enc, "decoder_ids": dec, "targets": tgt}


class MQARBatches:
    """``get_batch(index)`` for ``seqmem_shared.train.Trainer``: a fresh, reproducible batch per index
    (the ``train_min_pairs`` mixture when the config sets one)."""

    def __init__(self, config: Config, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.config, self.batch_size, self.device = config, batch_size, device

    def __call__(self, index: int) -> Batch:
        seed = (self.config.seed + 1) * 2**32 + index
        return mqar_batch(self.config, self.batch_size, seed, self.device, self.config.train_min_pairs)


SPLITS = ("test", "validation")


def heldout_set(config: Config, split: str = "test", device: torch.device | str = "cpu") -> Batch:
    """A fixed evaluation set of ``eval_examples`` examples: "test" (seed ``eval_seed``, what align-eval
    reports) or "validation" (seed ``eval_seed + 1``, watched during training)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return mqar_batch(config, config.eval_examples, config.eval_seed + SPLITS.index(split), device)
