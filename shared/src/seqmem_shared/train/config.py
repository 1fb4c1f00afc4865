"""``TrainConfig``: every knob of the shared training loop, validated on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from seqmem_shared.config import (
    ConfigError,
    boolean,
    choice,
    config_fields,
    from_dict,
    integer,
    mapping,
    number,
    optional,
    path,
    sequence,
    string,
    validate,
)

OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BEST_MODES = ("min", "max")


@dataclass
class TrainConfig:
    """Settings of :class:`~seqmem_shared.train.Trainer`.

    Steps count optimizer updates; one step consumes ``grad_accum_steps`` micro-batches per rank.
    ``eval_every``/``log_every``/``save_every`` of 0 mean "only at the end". ``precision="auto"`` is
    bf16 autocast on a CUDA device that supports it and fp32 elsewhere; "bf16"/"fp16" force autocast
    (on CPU too), "fp16" adds a GradScaler. ``grad_clip`` None or 0 disables clipping (the norm is still
    logged). ``tokens_per_batch``/``examples_per_batch`` (per micro-batch per rank) turn on throughput
    logging. ``best_metric`` names a key of ``eval_fn``'s dict; ``best.pt`` keeps the best by ``best_mode``.
    ``optimizer_kwargs`` go to ``seqmem_shared.optim.build_optimizer`` (e.g. ``adamw_lr``, ``adjust_lr_fn``).

    ``time_limit_s`` (None: no limit) ends a fit after the first step at which this fit's share of the
    Trainer's ``_elapsed`` clock reaches it. That clock is the wall time since the fit's training loop
    began (after resuming and ``on_fit_start``), read right after each step's optimizer update: it
    includes the evaluations, hooks, logging and checkpoint saves of the earlier steps (``elapsed_s`` in
    the metrics, which a resumed fit continues from the checkpoint; the limit counts only this fit's
    part). The stop acts like a callback's ``should_stop`` (partial log window, evaluation, checkpoint
    marked ``stopped_early``), but the checkpoint also marks it ``time_limited``, so a rerun with
    ``resume`` continues towards ``max_steps``, with the limit counted afresh. Under DDP rank 0's clock
    decides (one small broadcast per step). The Trainer logs the time of a fit's steps 1, 10 and 100,
    where compilation and autotuning show up.

    ``stop_on_nonfinite`` (default on) raises ``FloatingPointError`` at the first log step or save after
    a step whose loss was NaN or inf, naming that step, and before a save whose weights are not finite:
    nothing of a diverged model is saved, the last checkpoint stays the last finite one. It costs one
    small device sync per log step and a finiteness pass over the weights per save.
    """

    max_steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    precision: str = "auto"
    grad_accum_steps: int = 1
    eval_every: int = 0
    log_every: int = 10
    save_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    compile: bool = False
    resume: bool = True
    progress: bool = True
    best_metric: str | None = None
    best_mode: str = "min"
    eval_on_all_ranks: bool = False
    find_unused_parameters: bool = False
    tokens_per_batch: int | None = None
    examples_per_batch: int | None = None
    time_limit_s: float | None = None
    stop_on_nonfinite: bool = True

    def __post_init__(self) -> None:
        validate(self, _CHECKS)
        if self.warmup_steps > self.max_steps:
            raise ConfigError.invalid(self, "warmup_steps", f"an integer <= max_steps={self.max_steps}",
                                      self.warmup_steps)

    @classmethod
    def field_names(cls) -> list[str]:
        return config_fields(cls)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> TrainConfig:
        """Build from a plain mapping (e.g. a YAML section); unknown keys are a :class:`ConfigError`."""
        return from_dict(cls, d, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out["betas"] = list(self.betas)
        return out


_EVERY = "a non-negative integer (0: only at the end)"

TIME_LIMIT_S_CHECK = optional(number(0.0, lo_open=True), expected="a positive number of seconds or null")
"""The check of ``time_limit_s``, for package configs that pass it on to :class:`TrainConfig`."""

_CHECKS = {
    "max_steps": integer(1),
    "lr": number(0.0, lo_open=True),
    "weight_decay": number(0.0),
    "optimizer": choice(*OPTIMIZERS),
    "optimizer_kwargs": optional(mapping(),
                                 expected="a mapping of build_optimizer keyword -> value, or null"),
    "betas": sequence(number(0.0, 1.0, hi_open=True), length=2,
                      expected="two floats in [0, 1), e.g. [0.9, 0.95]"),
    "warmup_steps": integer(0),
    "min_lr_ratio": number(0.0, 1.0),
    "grad_clip": optional(number(0.0), expected="a non-negative float (0 or null disables clipping)"),
    "precision": choice(*PRECISIONS),
    "grad_accum_steps": integer(1),
    "eval_every": integer(0, expected=_EVERY),
    "log_every": integer(0, expected=_EVERY),
    "save_every": integer(0, expected=_EVERY),
    "out_dir": optional(path(expected="a directory path")),
    "seed": integer(0),
    "compile": boolean(),
    "resume": boolean(),
    "progress": boolean(),
    "best_metric": optional(string(nonempty=True), expected="the name of a key returned by eval_fn, or null"),
    "best_mode": choice(*BEST_MODES),
    "eval_on_all_ranks": boolean(),
    "find_unused_parameters": boolean(),
    "tokens_per_batch": optional(integer(1)),
    "examples_per_batch": optional(integer(1)),
    "time_limit_s": TIME_LIMIT_S_CHECK,
    "stop_on_nonfinite": boolean(),
}
