"""Portable, atomic training checkpoints: model, optimizer, scheduler, step, RNG states, data position.

A checkpoint is one ``torch.save`` dict::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "step": int,
     "rng": [per-rank RNG states], "data_state": ..., "config": dict | None, "extra": dict}

Model weights are saved from the unwrapped module (no ``module.``/``_orig_mod.`` prefixes), so a
checkpoint written under DDP or ``torch.compile`` loads into a plain model and vice versa. Files are
written to a temp file and renamed, so a crash mid-save never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seqmem_shared.io import atomic_torch_save
from seqmem_shared.train.distributed import get_rank

FORMAT = 1
REQUIRED_KEYS = ("model", "step")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model/optimizer it is loaded into."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel and ``torch.compile`` wrappers (any nesting)."""
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy, torch CPU and (if CUDA is in use) every CUDA device.

    Stored as plain Python values and tensors, so ``torch.load(weights_only=True)`` reads them.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored when the device count matches."""
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _state_dict(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
    data_state: Any = None,
    config: Any = None,
    rng_state: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write a checkpoint to ``path`` (temp file + rename); returns ``path``.

    ``rng_state`` is a list of per-rank states (default: this process's, from :func:`capture_rng_state`);
    ``config`` may be a dataclass with ``to_dict()`` or a plain dict.
    """
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    ckpt = {
        "format": FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": _state_dict(optimizer),
        "scheduler": _state_dict(scheduler),
        "step": int(step),
        "rng": rng_state if rng_state is not None else [capture_rng_state()],
        "data_state": data_state,
        "config": config,
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(ckpt, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def _strip_wrapper_prefixes(state: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Map keys saved from a wrapped model (``module.``, ``_orig_mod.``) onto ``own``'s key names."""
    out = {}
    for key, value in state.items():
        if key not in own:
            plain = key
            while plain.startswith(_WRAPPER_PREFIXES):
                plain = plain.split(".", 1)[1]
            plain = plain.replace("._orig_mod.", ".")
            key = plain if plain in own else key
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """``torch.load`` with one-line errors naming the file (missing, unreadable, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle error, disallowed global...
        hint = " (pass weights_only=False if you trust the file)" if "weights_only" in str(exc) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)}){hint}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks key(s) {missing}; present: {sorted(ckpt)}")
    return ckpt


def _load_model_state(path: Path, model: nn.Module, state: Mapping[str, Any]) -> None:
    own = model.state_dict()
    state = _strip_wrapper_prefixes(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: model weights do not match the model: missing keys {_names(missing)}, "
            f"unexpected keys {_names(unexpected)}"
        )
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if shapes:
        raise CheckpointError(f"{path}: model weight shapes differ: {_names(shapes, 3)}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: Any = "cpu",
    restore_rng: bool = True,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Restore ``model`` (strict), and ``optimizer``/``scheduler``/RNG states when given; returns the dict.

    The returned dict holds ``step``, ``data_state``, ``config`` and ``extra`` for the caller. RNG states
    are per rank: rank r restores entry r (entry 0 when the checkpoint came from fewer ranks).
    Errors are one line naming the file: missing, unreadable, missing keys, mismatched weights.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location=map_location, weights_only=weights_only)
    _load_model_state(path, unwrap_model(model), ckpt["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise CheckpointError(f"{path}: checkpoint has no {name} state to restore")
        try:
            obj.load_state_dict(ckpt[name])
        except Exception as exc:  # noqa: BLE001 - mismatched param groups, wrong optimizer type...
            raise CheckpointError(f"{path}: {name} state does not fit ({_first_line(exc)})") from None
    rng = ckpt.get("rng")
    if restore_rng and rng:
        states = rng if isinstance(rng, list) else [rng]
        rank = get_rank()
        restore_rng_state(states[rank] if rank < len(states) else states[0])
    return ckpt
