"""Training and evaluation on MQAR with ``seqmem_shared.train.Trainer``.

``python -m polar_mem_mamba.train --config X.yaml [--set key=value ...]``, also under
``torchrun --nproc_per_node=N`` (DDP; ``batch_size`` is the global batch, split over ranks). Fresh
MQAR batches are generated each step (:class:`~polar_mem_mamba.data.MQARBatches`); AdamW (fused on
CUDA) with warmup + cosine, bf16 autocast on CUDA, gradient clipping, optional ``torch.compile``;
``checkpoint.pt`` and ``metrics.jsonl`` under ``outputs/<run_name>/``; an existing checkpoint resumes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from seqmem_shared import config as shared_config
from seqmem_shared.kernels import cross_entropy
from seqmem_shared.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    init_distributed,
    load_checkpoint,
    ranks_finish_together,
)
from torch import nn

from polar_mem_mamba.config import Config, ConfigError
from polar_mem_mamba.data import Batch, MQARBatches, heldout_set
from polar_mem_mamba.models import HybridMambaEncoderDecoder

log = logging.getLogger("seqmem")


def build_model(config: Config, device: torch.device | str | None = None) -> HybridMambaEncoderDecoder:
    """The model of ``config`` on ``device``, seeded by ``config.seed`` (same init on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return HybridMambaEncoderDecoder(config, device=device)


def initial_model(config: Config, device: torch.device | str | None = None) -> HybridMambaEncoderDecoder:
    """The model a run starts training from: :func:`build_model`, then the weights of
    ``config.init_from`` when it names a checkpoint (errors name the field)."""
    model = build_model(config, device=device)
    if config.init_from is not None:
        path = Path(config.init_from)
        if not path.is_file():
            raise ConfigError(f"Config.init_from: checkpoint file not found: {path}")
        try:
            load_checkpoint(path, model, restore_rng=False)
        except CheckpointError as exc:
            raise ConfigError(f"Config.init_from: {exc}") from None
        log.info("seqmem: %s starts from the weights of %s", config.run_name or "run", path)
    return model


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy over answer positions, per-slot accuracy [M]) of logits [B, M+1, V] vs targets [B, M+1].

    Slot ``j`` is the ``j``-th query of each example (decoder position ``j + 1``).
    """
    answered = targets != -100
    correct = (logits.argmax(-1) == targets) & answered
    per_position = correct.sum(0).float() / answered.sum(0).clamp(min=1)
    return overall_accuracy(logits, targets), per_position[answered.any(0)]


def overall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy over the answer positions (targets != -100) of logits [B, T, V]; no host sync (the
    per-slot selection of :func:`answer_accuracy` has a data-dependent shape, which CUDA graphs forbid)."""
    answered = targets != -100
    correct = (logits.argmax(-1) == targets) & answered
    return correct.sum().float() / answered.sum().clamp(min=1)


def mqar_loss(config: Config) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``loss_fn(model, batch) -> (label-smoothed cross-entropy, {"accuracy": ...})`` for the Trainer."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["encoder_ids"], batch["decoder_ids"])
        loss = cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                             label_smoothing=config.label_smoothing, backend=config.backend)
        return loss, {"accuracy": overall_accuracy(logits.detach(), batch["targets"])}

    return loss_fn


@torch.no_grad()
def evaluate(model: nn.Module, config: Config, split: str = "test", batch: Batch | None = None
             ) -> dict[str, Any]:
    """Accuracy (overall and per query slot) and loss of ``model`` on a fixed held-out MQAR set.

    Returns ``{"accuracy", "per_slot_accuracy": [M floats], "loss", "num_examples"}``.
    """
    device = next(model.parameters()).device
    batch = batch if batch is not None else heldout_set(config, split, device)
    was_training = model.training
    model.eval()
    correct = answered = loss_sum = 0.0
    slot_correct = torch.zeros(config.num_queries, device=device)
    total = batch["encoder_ids"].shape[0]
    try:
        for start in range(0, total, config.eval_batch_size):
            part = {k: v[start:start + config.eval_batch_size] for k, v in batch.items()}
            logits = model(part["encoder_ids"], part["decoder_ids"]).float()
            targets = part["targets"]
            mask = targets != -100
            hits = (logits.argmax(-1) == targets) & mask
            correct += hits.sum().item()
            answered += mask.sum().item()
            slot_correct += hits[:, 1:].sum(0).float()
            loss_sum += cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                      backend=config.backend).item()
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(answered, 1), "per_slot_accuracy": (slot_correct / total).tolist(),
            "loss": loss_sum / max(answered, 1), "num_examples": total}


def train_config(config: Config, world_size: int = 1) -> TrainConfig:
    """The shared loop's settings for ``config`` (per-rank batch = ``batch_size // world_size``)."""
    if config.batch_size % world_size:
        raise ConfigError(f"Config.batch_size: expected a multiple of the {world_size} ranks, "
                          f"got {config.batch_size}")
    return TrainConfig(
        max_steps=config.max_steps, lr=config.learning_rate, weight_decay=config.weight_decay,
        optimizer="adamw", betas=config.betas, warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio, grad_clip=config.grad_clip, precision=config.precision,
        eval_every=config.eval_every, log_every=config.log_every, save_every=config.save_every,
        out_dir=str(config.run_dir), seed=config.seed, compile=config.compile, progress=config.progress,
        time_limit_s=config.time_limit_s,
        examples_per_batch=config.batch_size // world_size,
        tokens_per_batch=config.batch_size // world_size * (3 * config.num_pairs + config.num_queries + 3),
    )


def train(config: Config) -> tuple[HybridMambaEncoderDecoder, dict[str, Any]]:
    """Train (or resume) ``config``'s run; returns the model and the final logged metrics.

    Writes ``checkpoint.pt``, ``metrics.jsonl`` and ``config.yaml`` under ``config.run_dir``.
    """
    dist = init_distributed()
    model = initial_model(config, device=dist.device)
    validation = heldout_set(config, "validation", dist.device)

    def eval_fn(raw_model: nn.Module) -> dict[str, float]:
        result = evaluate(raw_model, config, batch=validation)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    if dist.is_main:
        _write_config(config)
    trainer = Trainer(model, train_config(config, dist.world_size), mqar_loss(config),
                      MQARBatches(config, config.batch_size // dist.world_size, dist.device), eval_fn=eval_fn)
    metrics = trainer.fit()
    return model, metrics


def _write_config(config: Config) -> None:
    import yaml
    from seqmem_shared.io import atomic_write_text

    atomic_write_text(config.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["d_state=16", "architecture=polar"]`` -> {"d_state": 16, "architecture": "polar"}, each value typed
    by its Config field; an unknown field is an error with a did-you-mean hint."""
    return shared_config.parse_overrides(items, Config)


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """``Config.from_yaml(path)`` with ``--set key=value`` overrides applied (and validated)."""
    config = Config.from_yaml(path)
    return config.replace(**parse_overrides(overrides)) if overrides else config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file of Config fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Config field (repeatable), e.g. --set d_state=16")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="polar_mem_mamba.train", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    with ranks_finish_together():
        _, metrics = train(config)
        is_main = init_distributed().is_main
    if is_main:
        acc = metrics.get("eval_accuracy")
        print(f"{config.run_name}: step {metrics.get('step')}, validation accuracy "
              f"{'n/a' if acc is None else f'{acc:.4f}'}; checkpoint {config.run_dir / 'checkpoint.pt'}")


if __name__ == "__main__":
    main()
