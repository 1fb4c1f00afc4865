"""``TrainConfig``: every knob of the shared training loop, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            check(self, name)
        if self.warmup_steps > self.max_steps:
            _fail("warmup_steps", f"an integer <= max_steps={self.max_steps}", self.warmup_steps)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain mapping (e.g. a YAML section); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"TrainConfig: expected a mapping of field -> value, got {type(d).__name__}")
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"TrainConfig: unknown field {unknown[0]!r}; expected one of {', '.join(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out["betas"] = list(self.betas)
        return out


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"TrainConfig.{name}: expected {expected}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_float(cfg: TrainConfig, name: str) -> float | None:
    """Coerce ints and numeric strings (YAML 1.1 reads ``3e-4`` as a string) to float in place."""
    v = getattr(cfg, name)
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        v = float(v)
    elif isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(v):
        return None
    setattr(cfg, name, v)
    return v


def _int_check(minimum: int, expected: str):
    def check(cfg: TrainConfig, name: str) -> None:
        v = getattr(cfg, name)
        if not _is_int(v) or v < minimum:
            _fail(name, expected, v)
    return check


def _float_check(lo: float, hi: float, lo_open: bool, expected: str):
    def check(cfg: TrainConfig, name: str) -> None:
        raw = getattr(cfg, name)
        v = _as_float(cfg, name)
        if v is None or v < lo or v > hi or (lo_open and v == lo):
            _fail(name, expected, raw)
    return check


def _choice_check(choices: tuple[str, ...]):
    def check(cfg: TrainConfig, name: str) -> None:
        v = getattr(cfg, name)
        if v not in choices:
            _fail(name, "one of " + ", ".join(repr(c) for c in choices), v)
    return check


def _bool_check(cfg: TrainConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, bool):
        _fail(name, "true or false", v)


def _optional_positive_int(cfg: TrainConfig, name: str) -> None:
    v = getattr(cfg, name)
    if v is not None and (not _is_int(v) or v < 1):
        _fail(name, "a positive integer or null", v)


def _check_betas(cfg: TrainConfig, name: str) -> None:
    v = cfg.betas
    ok = isinstance(v, (list, tuple)) and len(v) == 2
    if ok:
        try:
            pair = tuple(float(b) for b in v)
        except (TypeError, ValueError):
            ok = False
        else:
            ok = all(0.0 <= b < 1.0 for b in pair) and not any(isinstance(b, bool) for b in v)
    if not ok:
        _fail(name, "two floats in [0, 1), e.g. [0.9, 0.95]", v)
    cfg.betas = pair


def _check_grad_clip(cfg: TrainConfig, name: str) -> None:
    if cfg.grad_clip is None:
        return
    raw = cfg.grad_clip
    v = _as_float(cfg, name)
    if v is None or v < 0:
        _fail(name, "a non-negative float (0 or null disables clipping)", raw)


def _check_out_dir(cfg: TrainConfig, name: str) -> None:
    v = cfg.out_dir
    if v is None:
        return
    if not isinstance(v, (str, os.PathLike)) or str(v) == "":
        _fail(name, "a directory path or null", v)
    cfg.out_dir = os.fspath(v)


def _check_optimizer_kwargs(cfg: TrainConfig, name: str) -> None:
    v = cfg.optimizer_kwargs
    if v is not None and not (isinstance(v, Mapping) and all(isinstance(k, str) for k in v)):
        _fail(name, "a mapping of build_optimizer keyword -> value, or null", v)
    if v is not None:
        cfg.optimizer_kwargs = dict(v)


def _check_best_metric(cfg: TrainConfig, name: str) -> None:
    v = cfg.best_metric
    if v is not None and (not isinstance(v, str) or not v):
        _fail(name, "the name of a key returned by eval_fn, or null", v)


_CHECKS = {
    "max_steps": _int_check(1, "a positive integer"),
    "lr": _float_check(0.0, math.inf, True, "a positive float"),
    "weight_decay": _float_check(0.0, math.inf, False, "a non-negative float"),
    "optimizer": _choice_check(OPTIMIZERS),
    "optimizer_kwargs": _check_optimizer_kwargs,
    "betas": _check_betas,
    "warmup_steps": _int_check(0, "a non-negative integer"),
    "min_lr_ratio": _float_check(0.0, 1.0, False, "a float in [0, 1]"),
    "grad_clip": _check_grad_clip,
    "precision": _choice_check(PRECISIONS),
    "grad_accum_steps": _int_check(1, "a positive integer"),
    "eval_every": _int_check(0, "a non-negative integer (0: only at the end)"),
    "log_every": _int_check(0, "a non-negative integer (0: only at the end)"),
    "save_every": _int_check(0, "a non-negative integer (0: only at the end)"),
    "out_dir": _check_out_dir,
    "seed": _int_check(0, "a non-negative integer"),
    "compile": _bool_check,
    "resume": _bool_check,
    "progress": _bool_check,
    "best_metric": _check_best_metric,
    "best_mode": _choice_check(BEST_MODES),
    "eval_on_all_ranks": _bool_check,
    "find_unused_parameters": _bool_check,
    "tokens_per_batch": _optional_positive_int,
    "examples_per_batch": _optional_positive_int,
}
