"""``titans-train``: train the MAC transformer on bytes (enwik8 convention), as the seed's train_mac.py.

Hyperparameters keep the seed's names: ``--num-batches`` or ``NUM_BATCHES: ...`` in a YAML/JSON config
(``--config``; flags override it). Files in ``--out-dir``: ``titans_enwik8_best.pt`` (best validation
loss), ``checkpoint_batch_N.pt`` (every ``--save-every`` batches) and ``titans_enwik8.pt`` (final), each a
dict ``{batch, model_state_dict, optimizer_state_dict, val_loss, config}``; plus the shared trainer's
``checkpoint.pt`` (exact resume: rerun the same command) and ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from seqmem_shared.backends import default_device
from seqmem_shared.config import (
    Check,
    ConfigError,
    boolean,
    choice,
    from_dict,
    integer,
    number,
    parse_value,
    path,
    read_config_file,
    sequence,
    validate,
)
from seqmem_shared.io import atomic_torch_save
from seqmem_shared.train.config import PRECISIONS, TIME_LIMIT_S_CHECK

from .data import RandomCrops, decode_bytes, load_byte_splits
from .mac_transformer import MemoryAsContextTransformer
from .memory_models import MemoryAttention, MemoryMLP

log = logging.getLogger("titans_pytorch")


@dataclass
class TrainMACConfig:
    """The seed's hyperparameters (train_mac.py names, lower-cased)."""

    num_batches: int = 100_000
    batch_size: int = 4
    gradient_accumulate_every: int = 4
    learning_rate: float = 2e-4
    validate_every: int = 100
    generate_every: int = 500
    prime_length: int = 100
    generate_length: int = 512
    should_generate: bool = True
    seq_len: int = 512
    neural_memory_depth: int = 2
    num_persist_mem: int = 4
    num_longterm_mem: int = 4
    neural_mem_layers: tuple[int, ...] = (2, 4, 6)
    neural_mem_gate_attn_output: bool = False
    neural_mem_momentum: bool = True
    neural_mem_momentum_order: int = 1
    neural_mem_qk_norm: bool = True
    neural_mem_max_lr: float = 1e-1
    use_mem_attention_model: bool = False
    window_size: int = 32
    neural_mem_segment_len: int = 4
    neural_mem_batch_size: int = 128
    sliding_windows: bool = True
    store_attn_pool_chunks: bool = True
    memory_model_per_layer_learned_lr: bool = True
    neural_mem_weight_residual: bool = True
    neural_mem_qkv_receives_diff_view: bool = True
    neural_mem_spec_norm_surprises: bool = True
    use_accelerated_scan: bool = True
    use_flex_attn: bool = True
    use_fast_inference: bool = False
    # model size (fixed in the seed) and run settings
    dim: int = 384
    depth: int = 8
    num_tokens: int = 256
    max_grad_norm: float = 0.5
    save_every: int = 5000
    val_batches: int = 1
    data_path: str = "data/enwik8.gz"
    out_dir: str = "."
    seed: int = 0
    precision: str = "auto"
    time_limit_s: float | None = field(default=None, metadata={
        "help": "stop after this many seconds of training, then evaluate and save; rerunning resumes "
                "(default: no limit)"})

    def __post_init__(self) -> None:
        validate(self, _CHECKS)
        if any(layer > self.depth for layer in self.neural_mem_layers):
            raise ConfigError.invalid(
                self, "neural_mem_layers", f"layer numbers in [1, depth={self.depth}]", self.neural_mem_layers
            )

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "") -> TrainMACConfig:
        """Build from seed-style keys (``NUM_BATCHES``, ``num-batches``, ...); unknown keys and invalid
        values raise :class:`~seqmem_shared.config.ConfigError` (prefixed by ``source``)."""
        return from_dict(cls, raw, source, key=_field_name)

    def build_model(self) -> MemoryAsContextTransformer:
        mem_model = (
            MemoryAttention(dim=64)
            if self.use_mem_attention_model
            else MemoryMLP(dim=64, depth=self.neural_memory_depth)
        )
        return MemoryAsContextTransformer(
            num_tokens=self.num_tokens,
            dim=self.dim,
            depth=self.depth,
            segment_len=self.window_size,
            num_persist_mem_tokens=self.num_persist_mem,
            num_longterm_mem_tokens=self.num_longterm_mem,
            neural_memory_layers=self.neural_mem_layers,
            neural_memory_segment_len=self.neural_mem_segment_len,
            neural_memory_batch_size=self.neural_mem_batch_size,
            neural_mem_gate_attn_output=self.neural_mem_gate_attn_output,
            neural_mem_weight_residual=self.neural_mem_weight_residual,
            neural_memory_qkv_receives_diff_views=self.neural_mem_qkv_receives_diff_view,
            use_flex_attn=self.use_flex_attn and torch.cuda.is_available(),
            sliding_window_attn=self.sliding_windows,
            neural_memory_model=mem_model,
            neural_memory_kwargs=dict(
                dim_head=64,
                heads=4,
                attn_pool_chunks=self.store_attn_pool_chunks,
                qk_rmsnorm=self.neural_mem_qk_norm,
                momentum=self.neural_mem_momentum,
                momentum_order=self.neural_mem_momentum_order,
                default_step_transform_max_lr=self.neural_mem_max_lr,
                use_accelerated_scan=self.use_accelerated_scan,
                per_parameter_lr_modulation=self.memory_model_per_layer_learned_lr,
                spectral_norm_surprises=self.neural_mem_spec_norm_surprises,
            ),
        )


def _field_name(key: str) -> str:
    return key.lower().replace("-", "_")


_CHECKS: dict[str, Check] = {
    "num_batches": integer(1),
    "batch_size": integer(1),
    "gradient_accumulate_every": integer(1),
    "learning_rate": number(0.0, lo_open=True),
    "validate_every": integer(0, expected="a non-negative integer (0: only at the end)"),
    "generate_every": integer(0, expected="a non-negative integer (0: never)"),
    "prime_length": integer(1),
    "generate_length": integer(1),
    "should_generate": boolean(),
    "seq_len": integer(1),
    "neural_memory_depth": integer(1),
    "num_persist_mem": integer(0),
    "num_longterm_mem": integer(0),
    "neural_mem_layers": sequence(integer(1), distinct=True,
                                  expected="a list of distinct layer numbers >= 1"),
    "neural_mem_gate_attn_output": boolean(),
    "neural_mem_momentum": boolean(),
    "neural_mem_momentum_order": integer(1),
    "neural_mem_qk_norm": boolean(),
    "neural_mem_max_lr": number(0.0, lo_open=True),
    "use_mem_attention_model": boolean(),
    "window_size": integer(1),
    "neural_mem_segment_len": integer(1),
    "neural_mem_batch_size": integer(1),
    "sliding_windows": boolean(),
    "store_attn_pool_chunks": boolean(),
    "memory_model_per_layer_learned_lr": boolean(),
    "neural_mem_weight_residual": boolean(),
    "neural_mem_qkv_receives_diff_view": boolean(),
    "neural_mem_spec_norm_surprises": boolean(),
    "use_accelerated_scan": boolean(),
    "use_flex_attn": boolean(),
    "use_fast_inference": boolean(),
    "dim": integer(1),
    "depth": integer(1),
    "num_tokens": integer(1),
    "max_grad_norm": number(0.0, expected="a non-negative float (0 disables clipping)"),
    "save_every": integer(0, expected="a non-negative integer (0: only at the end)"),
    "val_batches": integer(1),
    "data_path": path(expected="a file path"),
    "out_dir": path(expected="a directory path"),
    "seed": integer(0),
    "precision": choice(*PRECISIONS),
    "time_limit_s": TIME_LIMIT_S_CHECK,
}


def _seed_checkpoint(trainer, cfg: TrainMACConfig, val_loss: float | None) -> dict:
    """The seed's checkpoint layout."""
    return {
        "batch": trainer.step,
        "model_state_dict": trainer.raw_model.state_dict(),
        "optimizer_state_dict": trainer.optimizer.state_dict(),
        "val_loss": val_loss,
        "config": asdict(cfg),
    }


class SeedCheckpoints:
    """Trainer callback: best/periodic/final checkpoints in the seed's layout, and periodic samples."""

    def __init__(self, cfg: TrainMACConfig, val: torch.Tensor):
        self.cfg, self.val = cfg, val
        self.best: float | None = None
        self.last_val: float | None = None
        self.out = Path(cfg.out_dir)

    def on_fit_start(self, trainer) -> None:
        best = self.out / "titans_enwik8_best.pt"
        if best.exists():
            self.best = torch.load(best, map_location="cpu", weights_only=False).get("val_loss")

    def on_eval_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        self.last_val = float(metrics["loss"])
        if trainer.is_main and (self.best is None or self.last_val < self.best):
            self.best = self.last_val
            atomic_torch_save(
                _seed_checkpoint(trainer, self.cfg, self.last_val), self.out / "titans_enwik8_best.pt"
            )

    def on_step_end(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        cfg = self.cfg
        if not (
            cfg.should_generate and cfg.generate_every and step % cfg.generate_every == 0 and trainer.is_main
        ):
            return
        model = trainer.raw_model
        start = int(torch.randint(0, len(self.val) - cfg.prime_length, (1,)))
        prime = self.val[start : start + cfg.prime_length].long().to(next(model.parameters()).device)
        sample = model.sample(
            prime[None],
            cfg.prime_length + cfg.generate_length,
            use_cache=cfg.use_fast_inference,
            show_progress=False,
        )
        print(f"\n[step {step}] {decode_bytes(prime)}\n{'*' * 40}\n{decode_bytes(sample[0])}\n", flush=True)

    def on_save(self, trainer, step: int, path: Path) -> None:
        if trainer.is_main and self.cfg.save_every and step % self.cfg.save_every == 0:
            atomic_torch_save(
                _seed_checkpoint(trainer, self.cfg, self.last_val), self.out / f"checkpoint_batch_{step}.pt"
            )

    def on_fit_end(self, trainer, metrics: dict[str, Any]) -> None:
        if trainer.is_main:
            atomic_torch_save(
                _seed_checkpoint(trainer, self.cfg, self.last_val), self.out / "titans_enwik8.pt"
            )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titans-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML or JSON file of hyperparameters (seed names, any case)")
    for f in fields(TrainMACConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "neural_mem_layers":
            p.add_argument(flag, type=int, nargs="*", default=None)
        else:  # typed by the field's annotation, checked by TrainMACConfig
            kind = functools.partial(parse_value, TrainMACConfig, f.name)
            metavar = "BOOL" if f.type in ("bool", bool) else None
            p.add_argument(flag, type=kind, default=None, metavar=metavar, help=f.metadata.get("help"))
    p.add_argument("--no-resume", action="store_true", help="start over even if out-dir has a checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_config(args: argparse.Namespace) -> TrainMACConfig:
    """``--config`` (YAML, or JSON when it ends in .json) with the flags given on top; a
    :class:`~seqmem_shared.config.ConfigError` names the file or "command line" and the field."""
    raw = read_config_file(args.config) if args.config else {}
    flags = {f.name: v for f in fields(TrainMACConfig) if (v := getattr(args, f.name)) is not None}
    try:
        return TrainMACConfig.from_mapping({**raw, **flags})
    except ConfigError as exc:
        raise exc.with_source("command line" if exc.field in flags else args.config or "") from None


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``titans-train`` (exit status 0)."""
    args = _parser().parse_args(argv)
    train(load_config(args), resume=not args.no_resume, progress=not args.no_progress)
    return 0


def train(cfg: TrainMACConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train with the shared Trainer; returns its final metrics."""
    from seqmem_shared.train import TrainConfig, Trainer

    train_bytes, val = load_byte_splits(cfg.data_path)
    device = default_device()
    torch.manual_seed(cfg.seed)
    model = cfg.build_model().to(device)
    val_crops = RandomCrops(val, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1, device=device)

    def eval_fn(raw_model) -> dict[str, float]:
        losses = [raw_model(val_crops(i), return_loss=True).float() for i in range(cfg.val_batches)]
        return {"loss": torch.stack(losses).mean().item()}

    tcfg = TrainConfig(
        max_steps=cfg.num_batches,
        lr=cfg.learning_rate,
        optimizer="adamw",
        weight_decay=0.0,
        grad_clip=cfg.max_grad_norm,
        grad_accum_steps=cfg.gradient_accumulate_every,
        eval_every=cfg.validate_every,
        save_every=cfg.save_every,
        out_dir=cfg.out_dir,
        seed=cfg.seed,
        precision=cfg.precision,
        resume=resume,
        progress=progress,
        log_every=min(10, cfg.num_batches),
        tokens_per_batch=cfg.batch_size * cfg.seq_len,
        time_limit_s=cfg.time_limit_s,
    )
    trainer = Trainer(
        model,
        tcfg,
        loss_fn=lambda m, batch: m(batch, return_loss=True),
        train_data=RandomCrops(train_bytes, cfg.seq_len, cfg.batch_size, seed=cfg.seed, device=device),
        eval_fn=eval_fn,
        callbacks=[SeedCheckpoints(cfg, val)],
    )
    return trainer.fit()


if __name__ == "__main__":
    raise SystemExit(train_main())
