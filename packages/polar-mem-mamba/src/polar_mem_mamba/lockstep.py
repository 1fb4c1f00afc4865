"""Train several small MQAR runs side by side in one process: shared batches, one CUDA graph per run.

Sweep models (d_model 64-128, 2 + 2 layers) are launch-bound on a GPU: an eager training step issues
~800 tiny kernels and the GPU idles between them. :func:`train_lockstep` trains a *group* of runs
whose data and loop agree (:func:`group_key`: same ``num_pairs``, ``num_queries``, ``vocab_size``,
``batch_size``, ``seed``, ``max_steps``, ``log_every``, ``eval_every``) step by step together. Each
MQAR batch is drawn once on the CPU (``MQARBatches(config)(step)``, the batch the shared Trainer
would use) and copied into one static device buffer. Each run's whole step (forward, backward,
clip, fused AdamW with a tensor learning rate) is captured once as a CUDA graph and replayed on the
run's own stream, so the runs of a group execute concurrently and one replay costs one launch.

The first ``WARMUP_STEPS`` steps run eagerly (they are real training steps; they also trigger any
Triton compilation and autotuning before capture). On the CPU, or with ``graphs=False``, or when a
capture fails (one log line), runs step eagerly with the same optimizer, schedule and batches as
``seqmem_shared.train.Trainer`` (tested equal on CPU). Each run ends with the files of a Trainer run
under ``config.run_dir``: ``checkpoint.pt`` (model, optimizer, scheduler at ``max_steps``),
``metrics.jsonl``, ``config.yaml``. A run is trained from step 0 (lockstep runs are short; an
interrupted one starts over). fp16 (GradScaler) is not supported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from seqmem_shared.backends import default_device
from seqmem_shared.optim import build_optimizer, cosine_with_warmup
from seqmem_shared.optim.schedule import warmup_cosine_factor
from seqmem_shared.train import save_checkpoint
from torch import nn

from polar_mem_mamba.config import Config, ConfigError
from polar_mem_mamba.data import Batch, MQARBatches, heldout_set
from polar_mem_mamba.train import _write_config, evaluate, initial_model, mqar_loss, train_config

log = logging.getLogger("seqmem")

WARMUP_STEPS = 3
GROUP_FIELDS = ("num_pairs", "train_min_pairs", "num_queries", "vocab_size", "batch_size", "seed",
                "max_steps", "log_every", "eval_every")


def group_key(config: Config) -> tuple:
    """What the runs of one lockstep group must share (they consume the same batches, step by step)."""
    return tuple(getattr(config, name) for name in GROUP_FIELDS)


def _autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    if config.precision == "fp16":
        raise ConfigError(f"{config._source or 'Config'}: precision: expected 'auto', 'bf16' or 'fp32' for "
                          "lockstep training (fp16 needs a GradScaler), got 'fp16'")
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class _Run:
    """One run of a group: model, AdamW, schedule, device-side metric sums and (maybe) its CUDA graph."""

    def __init__(self, config: Config, device: torch.device, tensor_lr: bool) -> None:
        self.config, self.device = config, device
        self.model = initial_model(config, device=device)
        self.optimizer = build_optimizer(self.model, name="adamw", lr=config.learning_rate,
                                         weight_decay=config.weight_decay, betas=config.betas)
        self.scheduler = cosine_with_warmup(self.optimizer, config.warmup_steps, config.max_steps,
                                            min_lr_ratio=config.min_lr_ratio)
        self.base_lrs = [float(g["initial_lr"]) for g in self.optimizer.param_groups]
        self.tensor_lr = tensor_lr
        if tensor_lr:  # a graph reads the learning rate from device memory, refilled before each replay
            for group in self.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
                group["capturable"] = True
        self.loss_fn = mqar_loss(config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = _autocast_dtype(config, device)
        self.sums = torch.zeros(3, device=device)  # loss, accuracy, grad norm since the last log
        self.count = 0
        self.last: dict[str, Any] = {}
        self.graph: Any = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def factor(self, step: int) -> float:
        cfg = self.config
        return warmup_cosine_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False)

    def _body(self, batch: Batch) -> None:
        with self._context():
            loss, extras = self.loss_fn(self.model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip or float("inf"))
        self.optimizer.step()
        self.sums += torch.stack([loss.detach().float(), extras["accuracy"].float(), norm.float()])

    def step(self, batch: Batch, step: int) -> None:
        """Training step ``step`` on ``batch`` (the static buffer when a graph is captured)."""
        if self.tensor_lr:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"].fill_(base * self.factor(step))
        if self.graph is not None:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._body(batch)
            if not self.tensor_lr:
                self.scheduler.step()
        self.count += 1

    def capture(self, batch: Batch) -> None:
        """Record one whole training step on ``batch`` (static tensors) as a CUDA graph.

        Captured on the run's own stream, not torch's one default capture stream: cuBLAS workspaces are
        kept per (handle, stream), so graphs captured on one stream share one workspace, and their
        concurrent replays on the runs' streams would race on it."""
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._body(batch)
        self.graph = graph

    def take_metrics(self) -> dict[str, float]:
        loss, accuracy, norm = (self.sums / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return {"loss": loss, "accuracy": accuracy, "grad_norm": norm}

    def finish(self, step: int) -> None:
        """Float learning rates and the scheduler at ``step`` again, so checkpoints match the Trainer's."""
        if self.tensor_lr:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * self.factor(step)
            self.scheduler.last_epoch = step
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def train_lockstep(configs: Sequence[Config], device: torch.device | str | None = None,
                   graphs: bool = True) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Train ``configs`` (one :func:`group_key`) together; returns (model, final metrics) per run.

    ``graphs`` captures CUDA graphs on a CUDA device (ignored on the CPU). Writes every run's
    ``checkpoint.pt``, ``metrics.jsonl`` and ``config.yaml``.
    """
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"train_lockstep: runs must share {', '.join(GROUP_FIELDS)}; got {sorted(keys)}")
    device = default_device(device)
    first = configs[0]
    use_graphs = graphs and device.type == "cuda" and first.max_steps > WARMUP_STEPS
    runs = [_Run(c, device, tensor_lr=use_graphs) for c in configs]
    batches = MQARBatches(first, first.batch_size, "cpu")
    static = {k: v.to(device) for k, v in batches(0).items()}
    validation = [heldout_set(c, "validation", device) for c in configs]
    files = []
    for run in runs:
        _write_config(run.config)
        path = run.config.run_dir / "metrics.jsonl"
        files.append(path.open("w"))
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    start = clock = time.perf_counter()
    log_step = 0
    try:
        for step in range(first.max_steps):
            batch = batches(step)
            if main is not None:
                for run in runs:
                    main.wait_stream(run.stream)  # every replay of the last step has read the buffer
            for name, tensor in batch.items():
                static[name].copy_(tensor)
            if use_graphs and step == WARMUP_STEPS:
                torch.cuda.synchronize(device)
                for run in runs:
                    if not _try_capture(run, static):
                        break  # the rest would fail the same way: eager (runs captured so far keep graphs)
            for run in runs:
                with torch.cuda.stream(run.stream) if run.stream is not None else contextlib.nullcontext():
                    if run.stream is not None:
                        run.stream.wait_stream(main)
                    run.step(static, step)
            done = step + 1
            last = done == first.max_steps
            log_due = (first.log_every and done % first.log_every == 0) or last
            eval_due = (first.eval_every and done % first.eval_every == 0) or last
            if not (log_due or eval_due):
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            per_s = (done - log_step) / max(now - clock, 1e-9)
            for run, file, val in zip(runs, files, validation):
                record: dict[str, Any] = {"step": done, "lr": run.base_lrs[0] * run.factor(done)}
                if log_due:
                    record.update(run.take_metrics())
                    record.update(examples_per_s=run.config.batch_size * per_s, elapsed_s=now - start,
                                  cuda_graph=run.graph is not None)
                if eval_due:
                    with run._context():
                        result = evaluate(run.model, run.config, batch=val)
                    record.update(eval_accuracy=result["accuracy"], eval_loss=result["loss"])
                file.write(json.dumps(record) + "\n")
                file.flush()
                run.last.update(record)
            if log_due:
                log.info("seqmem: lockstep %s: step %d/%d, %d runs (%d as CUDA graphs), %.1f steps/s",
                         first.run_name, done, first.max_steps, len(runs),
                         sum(r.graph is not None for r in runs), per_s)
            clock, log_step = time.perf_counter(), done
    finally:
        for file in files:
            file.close()
    for run in runs:
        run.finish(first.max_steps)
        save_checkpoint(run.config.run_dir / "checkpoint.pt", run.model, run.optimizer, run.scheduler,
                        first.max_steps, extra={"trainer": {"last_metrics": run.last, "world_size": 1,
                                                            "elapsed_s": time.perf_counter() - start}},
                        config=train_config(run.config))
    return [(run.model, run.last) for run in runs]


def _try_capture(run: _Run, static: Batch) -> bool:
    """Capture ``run``'s step; on failure log the root cause once and leave the run eager."""
    try:
        run.capture(static)
        return True
    except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: train eagerly
        run.graph = None
        cause = exc.__context__ or exc  # capture_end's error hides the op that broke the capture
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        log.warning("seqmem: CUDA graph capture failed for %s (%s: %s); it and the group's later runs "
                    "train eagerly",
                    run.config.run_name, type(cause).__name__, first)
        return False
