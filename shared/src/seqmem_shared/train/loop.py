"""The training loop shared by the seqmem packages.

``Trainer(model, config, loss_fn, train_data, eval_fn=None, ...).fit()`` runs ``config.max_steps``
optimizer steps with autocast, gradient accumulation and clipping, a warmup-cosine schedule, periodic
evaluation, a tqdm bar and JSON-lines metrics on rank 0, atomic checkpoints and exact resume, an
optional wall-clock limit (``time_limit_s``), and DDP when launched by ``torchrun``.

Data: ``train_data`` is one of

- an object with ``next_batch(index)`` (plus optional ``state_dict()``/``load_state_dict()``, saved
  in checkpoints as the data position);
- a callable ``get_batch(index)``, deterministic in ``index`` (e.g. MQAR generated on the device from
  a seed and ``index``): resume needs no state;
- an iterable of batches (re-iterated when exhausted) or an iterator; with ``state_dict()``/
  ``load_state_dict()`` it resumes exactly, otherwise resume skips the batches already consumed (with a
  warning). ``StreamingTextDataset(...).batches(batch_size)`` is such a resumable iterable.

``index`` is the global micro-batch counter ``(step * grad_accum_steps + micro) * world_size + rank``:
every rank and micro-batch gets a distinct index, and DDP over W ranks with accumulation A consumes the
same indices as one process with accumulation W * A. Sources that ignore ``index`` must differ per rank
themselves (seed or shard them with ``get_rank()``). Checkpoints keep every rank's data state and RNG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seqmem_shared.io import atomic_write_text
from seqmem_shared.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from seqmem_shared.train.config import TrainConfig
from seqmem_shared.train.distributed import (
    all_gather_object,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
)

log = logging.getLogger("seqmem")

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"


class Callback:
    """Hooks of :meth:`Trainer.fit`; subclass and override what you need (any object with these works).

    Hooks run on every rank, in this order within a step: ``on_eval_end`` (eval steps),
    ``on_step_end``, ``on_save`` (after a checkpoint is written). ``on_step_end``'s ``metrics`` always
    has ``step`` and ``lr``, plus the logged values (loss, grad_norm, ...) on log steps and
    ``eval_*`` on eval steps: reading them never forces a device sync. Set ``trainer.should_stop = True``
    to end training after this step (on every rank under DDP: decide from ``metrics``, which agree); the
    final checkpoint records it, so a resumed re-run counts the run as finished (a ``time_limit_s`` stop,
    in contrast, resumes).
    Hooks that consume RNG (e.g. sampling) run before the checkpoint is written, so resume stays exact.
    Guard printing with ``trainer.is_main``.
    """

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None: ...

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer: Trainer, step: int, path: Path) -> None: ...

    def on_fit_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``; dicts, lists, tuples and namedtuples keep their type."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        items = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_ok else None
    if precision == "bf16":
        if not bf16_ok:
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"TrainConfig.precision: 'bf16' is unsupported on {name}; "
                             "expected 'fp16' or 'fp32'")
        return torch.bfloat16
    return torch.float16


def _split_loss(out: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
    loss, extras = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: expected a scalar loss tensor or (loss, dict of floats), got {what}")
    if not isinstance(extras, Mapping):
        raise ValueError(f"loss_fn: expected (loss, dict of floats), got (loss, {type(extras).__name__})")
    return loss, extras


def _optim(name: str) -> Any:
    """``seqmem_shared.optim.<name>``, imported on first use (only the defaults need it)."""
    try:
        from seqmem_shared import optim

        return getattr(optim, name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"Trainer: seqmem_shared.optim.{name} is unavailable ({exc}); "
                           "pass optimizer= and scheduler= explicitly") from exc


class _DataSource:
    """Uniform ``next(index)``/``state_dict()``/``restore()`` over the three kinds of ``train_data``."""

    def __init__(self, data: Any) -> None:
        self.data = data
        if callable(getattr(data, "next_batch", None)):
            self.kind = "next_batch"
        elif hasattr(data, "__iter__"):
            self.kind = "iterable"
        elif callable(data):
            self.kind = "callable"
        else:
            raise TypeError(f"train_data: expected an object with next_batch(index), a callable "
                            f"get_batch(index) or an iterable, got {type(data).__name__}")
        self.stateful = callable(getattr(data, "state_dict", None)) and callable(
            getattr(data, "load_state_dict", None))
        self._it: Any = None
        self._skip = 0

    def next(self, index: int) -> Any:
        if self.kind == "next_batch":
            return self.data.next_batch(index)
        if self.kind == "callable":
            return self.data(index)
        if self._it is None:
            self._it = iter(self.data)
            for _ in range(self._skip):
                self._next_item()
            self._skip = 0
        return self._next_item()

    def _next_item(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            if self._it is self.data:
                raise RuntimeError("train_data: the iterator ran out of batches; pass a re-iterable "
                                   "dataset/loader or a get_batch(index) callable") from None
        self._it = iter(self.data)  # next epoch
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("train_data: the iterable yields no batches") from None

    def state_dict(self) -> Any:
        return self.data.state_dict() if self.stateful else None

    def restore(self, state: Any, consumed: int) -> None:
        if self.stateful and state is not None:
            self.data.load_state_dict(state)
        elif self.kind == "iterable" and consumed:
            log.warning("seqmem: train_data has no state_dict(); resuming by skipping %d consumed batches",
                        consumed)
            self._skip = consumed


class _Window:
    """Running sums of the training values between two log steps (tensors: no per-step device sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: Any = 0.0
        self.micro = 0
        self.grad_norm: Any = 0.0
        self.steps = 0
        self.extras: dict[str, list[Any]] = {}

    def add_micro(self, loss: torch.Tensor, extras: Mapping[str, Any]) -> None:
        self.loss = self.loss + loss.detach().float()
        self.micro += 1
        for key, value in extras.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"loss_fn: metric {key!r} must be a float or scalar tensor, "
                                 f"got {type(value).__name__}")
            acc = self.extras.setdefault(key, [0.0, 0])
            acc[0] = acc[0] + value
            acc[1] += 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm = self.grad_norm + grad_norm.detach().float()
        self.steps += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means over the window (and over ranks); resets the window. Collective under DDP."""
        keys = ["loss", "grad_norm", *sorted(self.extras)]
        values = [self.loss / max(self.micro, 1), self.grad_norm / max(self.steps, 1)]
        values += [s / n for s, n in (self.extras[k] for k in keys[2:])]
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                               for v in values])
        means = all_reduce_mean(stacked).tolist()
        self.reset()
        return dict(zip(keys, means))

    def __bool__(self) -> bool:
        return self.steps > 0


class Trainer:
    """Train ``model`` for ``config.max_steps`` optimizer steps; see the module docstring for ``train_data``.

    Args:
        model: the module (on its device; under torchrun put it on ``init_distributed().device``).
        config: a :class:`TrainConfig` or a dict for :meth:`TrainConfig.from_dict`.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, {name: float or scalar tensor})``; ``model``
            is the DDP/compiled wrapper (call it, don't read attributes: use ``trainer.raw_model``).
        eval_fn: ``eval_fn(raw_model) -> {name: float}``, run in eval mode under ``torch.no_grad`` and
            autocast, on rank 0 (result broadcast) or on every rank and averaged (``eval_on_all_ranks``).
        optimizer: default ``seqmem_shared.optim.build_optimizer(model, name=config.optimizer, ...)``.
        scheduler: stepped once per optimizer step; default ``cosine_with_warmup(optimizer,
            config.warmup_steps, config.max_steps, config.min_lr_ratio)``.
        callbacks: :class:`Callback` objects.

    Files under ``config.out_dir`` (rank 0): ``checkpoint.pt`` (every ``save_every`` steps and at the
    end), ``best.pt`` (when ``best_metric`` improves), ``metrics.jsonl`` (one JSON object per log/eval
    step). With ``resume`` an existing ``checkpoint.pt`` is continued exactly: model, optimizer,
    scheduler, grad scaler, per-rank RNG and data states; metric lines past its step are dropped.
    A NaN/inf loss raises ``FloatingPointError`` before the diverged model is saved
    (``TrainConfig.stop_on_nonfinite``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | Mapping[str, Any],
        loss_fn: Callable[[nn.Module, Any], Any],
        train_data: Any,
        eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        if isinstance(config, Mapping):
            config = TrainConfig.from_dict(config)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig or a dict, got {type(config).__name__}")
        self.config = config
        self.dist = init_distributed()
        self.raw_model = unwrap_model(model)
        self.device = _model_device(self.raw_model)
        if self.dist.world_size > 1 and self.dist.device.type == "cuda" and self.device != self.dist.device:
            raise ValueError(f"model: on {self.device} but rank {self.dist.rank} must train on "
                             f"{self.dist.device}; call model.to(init_distributed().device) first")
        self.autocast_dtype = _autocast_dtype(config.precision, self.device)
        self.optimizer = optimizer if optimizer is not None else self._default_optimizer()
        self.scheduler = scheduler if scheduler is not None else self._default_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.model = self._wrap(model)
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.data = _DataSource(train_data)
        self.callbacks = list(callbacks or [])
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.step = 0
        self.should_stop = False
        self.best: float | None = None
        self.last_metrics: dict[str, Any] = {}
        self._params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self._consumed = 0
        self._elapsed = 0.0
        self._time_limited = False
        self._best_due = False
        self._first_nonfinite = torch.zeros((), dtype=torch.long, device=self.device)  # 1-based; 0: none

    # ----------------------------------------------------------------------------------- setup

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir else None

    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / METRICS_NAME if self.out_dir else None

    def _default_optimizer(self) -> torch.optim.Optimizer:
        build_optimizer = _optim("build_optimizer")
        cfg = self.config
        kwargs = {"name": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": cfg.betas,
                  **(cfg.optimizer_kwargs or {})}
        try:
            return build_optimizer(self.raw_model, **kwargs)
        except TypeError as exc:  # an optimizer_kwargs key build_optimizer does not take
            raise ValueError(f"TrainConfig.optimizer_kwargs: {exc}") from None

    def _default_scheduler(self) -> Any:
        cosine_with_warmup = _optim("cosine_with_warmup")
        cfg = self.config
        return cosine_with_warmup(self.optimizer, cfg.warmup_steps, cfg.max_steps,
                                  min_lr_ratio=cfg.min_lr_ratio)

    def _wrap(self, model: nn.Module) -> nn.Module:
        self._ddp: DistributedDataParallel | None = None
        wrapped = model
        if self.dist.world_size > 1:
            if isinstance(model, DistributedDataParallel):
                self._ddp = model
            else:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self._ddp = DistributedDataParallel(
                    self.raw_model, device_ids=device_ids,
                    find_unused_parameters=self.config.find_unused_parameters)
                wrapped = self._ddp
        if self.config.compile and type(wrapped).__name__ != "OptimizedModule":
            wrapped = torch.compile(wrapped)
        return wrapped

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(*args)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------ training

    def fit(self) -> dict[str, Any]:
        """Train to ``config.max_steps`` (resuming if asked); returns the latest value of every metric."""
        cfg = self.config
        self.should_stop = self._time_limited = False
        if not self._maybe_resume():
            seed_everything(cfg.seed + self.dist.rank)
        self._call("on_fit_start", self)
        if self.step >= cfg.max_steps or self.should_stop:
            why = "was stopped early by a callback" if self.should_stop else "is already at max_steps"
            log.info("seqmem: %s %s (step %d); nothing to train (resume=False starts over)",
                     self.checkpoint_path, why, self.step)
            return dict(self.last_metrics)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.is_main and cfg.progress))
        metrics_file = None
        if self.is_main and self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_file = self.metrics_path.open("a")
        window = _Window()
        self._first_nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        clock = {"start": time.perf_counter(), "log": time.perf_counter(), "log_step": self.step}
        elapsed0, step0 = self._elapsed, self.step
        self.model.train()
        try:
            while self.step < cfg.max_steps and not self.should_stop:
                self._train_step(window)
                self.step += 1
                bar.update(1)
                self._elapsed = elapsed0 + time.perf_counter() - clock["start"]
                fit_seconds = self._elapsed - elapsed0
                if self.step - step0 in (1, 10, 100):  # compilation and autotuning show up here
                    log.info("seqmem: step %d, %d steps into this fit, at %.1f s", self.step,
                             self.step - step0, fit_seconds)
                last = self.step == cfg.max_steps
                record: dict[str, Any] = {"step": self.step, "lr": self._lr()}
                if (cfg.log_every and self.step % cfg.log_every == 0) or last:
                    self._raise_if_nonfinite()
                    record.update(self._log_values(window, clock))
                overhead_start = time.perf_counter()  # eval, hooks and saving don't count as training time
                eval_due = cfg.eval_every and self.step % cfg.eval_every == 0
                if self.eval_fn is not None and (eval_due or last):
                    record.update(self._evaluate())
                self._call("on_step_end", self, self.step, record)
                if not (self.should_stop or last) and self._time_is_up(fit_seconds):
                    self.should_stop = self._time_limited = True
                    log.info("seqmem: time_limit_s=%g reached at step %d after %.1f s; stopping",
                             cfg.time_limit_s, self.step, fit_seconds)
                if self.should_stop and not last:  # stopping early: log the partial window, evaluate
                    if window:
                        record.update(self._log_values(window, clock))
                    if self.eval_fn is not None and not any(k.startswith("eval_") for k in record):
                        record.update(self._evaluate())
                self._write_record(record, metrics_file, bar)
                if self.out_dir is not None:
                    periodic = cfg.save_every and self.step % cfg.save_every == 0
                    save_due = periodic or last or self.should_stop
                    if save_due or self._best_due:
                        self._raise_if_nonfinite(saving=True)
                    if save_due:
                        self.save()
                    if self._best_due:
                        self.save(self.out_dir / BEST_NAME)
                        self._best_due = False
                clock["log"] += time.perf_counter() - overhead_start
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        final = dict(self.last_metrics)
        self._call("on_fit_end", self, final)
        return final

    def _time_is_up(self, fit_seconds: float) -> bool:
        """Whether this fit has run ``time_limit_s``; rank 0 decides for all (collective under DDP)."""
        limit = self.config.time_limit_s
        return limit is not None and bool(broadcast_object(fit_seconds >= limit))

    def _train_step(self, window: _Window) -> None:
        cfg = self.config
        accum, world, rank = cfg.grad_accum_steps, self.dist.world_size, self.dist.rank
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            index = (self.step * accum + micro) * world + rank
            batch = move_to_device(self.data.next(index), self.device)
            self._consumed += 1
            sync = self._ddp is not None and micro == accum - 1
            with contextlib.nullcontext() if self._ddp is None or sync else self._ddp.no_sync():
                with self._autocast():
                    loss, extras = _split_loss(self.loss_fn(self.model, batch))
                self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            window.add_micro(loss, extras)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        window.add_step(grad_norm)
        if cfg.stop_on_nonfinite:  # device ops only; read by _raise_if_nonfinite
            # the window sums the losses since the last log: it turns non-finite at the first bad step
            first, bad = self._first_nonfinite, ~torch.isfinite(window.loss)
            self._first_nonfinite = torch.where((first == 0) & bad, self.step + 1, first)

    def _raise_if_nonfinite(self, saving: bool = False) -> None:
        """``FloatingPointError`` if a step of this fit had a NaN/inf loss on any rank or, when
        ``saving``, a weight is NaN/inf; called before logging and saving (one sync, collective)."""
        if not self.config.stop_on_nonfinite:
            return
        weights_ok = True
        if saving and self._params:
            weights_ok = bool(torch.stack([p.isfinite().all() for p in self._params]).all())
        states = all_gather_object((int(self._first_nonfinite), weights_ok))
        bad = [step for step, _ in states if step]
        if bad:
            what = f"the loss is not finite since step {min(bad)}"
        elif not all(ok for _, ok in states):
            what = f"the weights are not finite at step {self.step}"
        else:
            return
        path = self.checkpoint_path
        kept = (f"the last checkpoint {path} is kept" if path is not None and path.is_file()
                else "no checkpoint was written")
        raise FloatingPointError(f"Trainer: {what} (diverged); {kept}; expected a lower TrainConfig.lr or "
                                 "more warmup_steps (stop_on_nonfinite=False trains on)")

    def _log_values(self, window: _Window, clock: dict[str, float]) -> dict[str, float]:
        cfg = self.config
        values = window.reduce(self.device)
        now = time.perf_counter()
        seconds, steps = now - clock["log"], self.step - clock["log_step"]
        clock["log"], clock["log_step"] = now, self.step
        per_step = cfg.grad_accum_steps * self.dist.world_size * steps / max(seconds, 1e-9)
        if cfg.tokens_per_batch:
            values["tokens_per_s"] = cfg.tokens_per_batch * per_step
        if cfg.examples_per_batch:
            values["examples_per_s"] = cfg.examples_per_batch * per_step
        values["elapsed_s"] = self._elapsed
        return values

    def _write_record(self, record: dict[str, Any], file: Any, bar: Any) -> None:
        if len(record) <= 2:  # only step and lr: nothing logged at this step
            return
        self.last_metrics.update(record)
        if not self.is_main:
            return
        if file is not None:
            file.write(json.dumps(record) + "\n")
            file.flush()
        if "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        evals = {k: v for k, v in record.items() if k.startswith("eval_")}
        if evals:
            line = f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in evals.items())
            if bar.disable:
                log.info("seqmem: %s", line)
            else:
                bar.write(line)
        elif bar.disable:
            log.info("seqmem: %s", json.dumps(record))

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` now (collective under DDP); returns its metrics prefixed with ``eval_``."""
        if self.eval_fn is None:
            raise ValueError("eval_fn: none was given to the Trainer")
        return self._evaluate()

    def _run_eval(self) -> dict[str, float]:
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            with torch.no_grad(), self._autocast():
                out = self.eval_fn(self.raw_model)
        finally:
            self.raw_model.train(was_training)
        if not isinstance(out, Mapping):
            raise ValueError(f"eval_fn: expected a dict of floats, got {type(out).__name__}")
        return {k: float(v) for k, v in out.items()}

    def _evaluate(self) -> dict[str, float]:
        cfg = self.config
        if self.dist.world_size == 1:
            metrics = self._run_eval()
        elif cfg.eval_on_all_ranks:
            metrics = self._run_eval()
            keys = sorted(metrics)
            reduced = all_reduce_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                                   device=self.device)).tolist()
            metrics = dict(zip(keys, reduced))
        else:
            metrics = broadcast_object(self._run_eval() if self.is_main else None)
        self._call("on_eval_end", self, self.step, metrics)
        if cfg.best_metric is not None:
            if cfg.best_metric not in metrics:
                raise ValueError(f"TrainConfig.best_metric: {cfg.best_metric!r} is not returned by eval_fn; "
                                 f"expected one of {sorted(metrics)}")
            value = metrics[cfg.best_metric]
            if self.best is None or (value < self.best if cfg.best_mode == "min" else value > self.best):
                self.best = value
                self._best_due = True
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path | None = None) -> Path:
        """Write a resumable checkpoint (default ``out_dir/checkpoint.pt``); collective under DDP."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("TrainConfig.out_dir: expected a directory to save checkpoints in, got None")
        rng = all_gather_object(capture_rng_state())
        data_state = all_gather_object(self.data.state_dict())
        consumed = all_gather_object(self._consumed)
        if self.is_main:
            trainer_state = {
                "scaler": self.scaler.state_dict(),
                "best": self.best,
                "consumed": consumed,
                "last_metrics": self.last_metrics,
                "elapsed_s": self._elapsed,
                "world_size": self.dist.world_size,
                "stopped_early": self.should_stop,
                "time_limited": self._time_limited,
            }
            save_checkpoint(path, self.raw_model, self.optimizer, self.scheduler, self.step,
                            extra={"trainer": trainer_state}, data_state=data_state, config=self.config,
                            rng_state=rng)
        barrier()
        self._call("on_save", self, self.step, path)
        return path

    def _maybe_resume(self) -> bool:
        path = self.checkpoint_path
        if not (self.config.resume and path is not None and path.is_file()):
            return False
        try:
            ckpt = load_checkpoint(path, self.raw_model, self.optimizer, self.scheduler)
        except CheckpointError as exc:  # e.g. numpy objects in a data state: this run's own file, trust it
            if "weights_only" not in str(exc):
                raise
            log.warning("seqmem: %s holds non-tensor objects; loading it with weights_only=False", path)
            ckpt = load_checkpoint(path, self.raw_model, self.optimizer, self.scheduler, weights_only=False)
        state = ckpt.get("extra", {}).get("trainer", {})
        self.step = int(ckpt["step"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = state.get("best")
        self.last_metrics = dict(state.get("last_metrics", {}))
        self._elapsed = float(state.get("elapsed_s", 0.0))
        # a callback's stop finishes the run; a time-limit stop resumes towards max_steps
        self.should_stop = bool(state.get("stopped_early", False)) and not state.get("time_limited", False)
        rank = self.dist.rank
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size and self.data.kind != "callable":
            log.warning("seqmem: %s was written by %d ranks, resuming on %d: data positions are approximate",
                        path, saved_world, self.dist.world_size)
        data_states = ckpt.get("data_state") or [None]
        consumed = state.get("consumed") or [0]
        pick = rank if rank < len(consumed) else 0
        self._consumed = int(consumed[pick])
        self.data.restore(data_states[pick] if pick < len(data_states) else None, self._consumed)
        if self.is_main:
            self._truncate_metrics()
        log.info("seqmem: resumed from %s at step %d", path, self.step)
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint we resume from (and any torn last line)."""
        path = self.metrics_path
        if path is None or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= self.step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
