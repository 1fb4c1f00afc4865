"""Reading ``metrics.jsonl`` and asking whether two training-loss curves agree within their own noise
(e.g. one process vs ``torchrun`` with the same global batch, which see different but equally
distributed batches).

The noise of a logged curve ``l_i`` (each value already a mean over ``log_every`` steps) is estimated
from its second differences: for a smooth trend plus independent noise of standard deviation ``s``,
``l_{i+1} - 2 l_i + l_{i-1}`` has standard deviation ``sqrt(6) s`` (the trend's curvature is small
between neighbouring log steps); the median absolute deviation keeps the fast early descent from
inflating it. Two curves that differ only by such noise have differences of RMS
``sqrt(s_a^2 + s_b^2)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seqmem_shared.io import jsonl_records


def read_metrics(path: str | Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of ``key`` from a Trainer's ``metrics.jsonl`` (records without it are skipped;
    a step logged twice, e.g. across a resume, keeps its last value)."""
    curve: dict[int, float] = {}
    for _, record in jsonl_records(Path(path).read_text().splitlines(), path):
        if key in record and "step" in record:
            curve[int(record["step"])] = float(record[key])
    return curve


def curve_noise(values: torch.Tensor) -> float:
    """Standard deviation of the step-to-step noise of a curve [n] (n >= 3), from its second
    differences (robust: 1.4826 x their median absolute deviation / sqrt(6))."""
    if values.numel() < 3:
        raise ValueError(f"curve_noise: expected at least 3 logged values, got {values.numel()}")
    second = values[2:] - 2 * values[1:-1] + values[:-2]
    mad = (second - second.median()).abs().median()
    return float(1.4826 * mad / math.sqrt(6))


@dataclass
class CurveComparison:
    """Two curves on their common steps: differences ``a - b`` against the noise they would have if the
    curves differed only by each one's own noise (``agree``: ``rms_diff <= threshold * noise``)."""

    common_steps: int
    first_step: int
    last_step: int
    mean_diff: float
    rms_diff: float
    max_abs_diff: float
    noise: float
    ratio: float
    threshold: float
    agree: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_curves(a: dict[int, float], b: dict[int, float], threshold: float = 2.0,
                   skip_fraction: float = 0.0) -> CurveComparison:
    """Compare two ``{step: value}`` curves on the steps logged in both, after dropping the first
    ``skip_fraction`` of them (e.g. 0.1 to leave out the initial descent)."""
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"compare_curves: skip_fraction expected in [0, 1), got {skip_fraction}")
    steps = sorted(set(a) & set(b))
    steps = steps[int(len(steps) * skip_fraction):]
    if len(steps) < 3:
        raise ValueError(f"compare_curves: expected at least 3 common logged steps, got {len(steps)}")
    va = torch.tensor([a[s] for s in steps], dtype=torch.float64)
    vb = torch.tensor([b[s] for s in steps], dtype=torch.float64)
    diff = va - vb
    noise = math.hypot(curve_noise(va), curve_noise(vb))
    rms = float(diff.square().mean().sqrt())
    ratio = rms / noise if noise > 0 else (0.0 if rms == 0 else math.inf)
    return CurveComparison(common_steps=len(steps), first_step=steps[0], last_step=steps[-1],
                           mean_diff=float(diff.mean()), rms_diff=rms, max_abs_diff=float(diff.abs().max()),
                           noise=noise, ratio=ratio, threshold=threshold, agree=ratio <= threshold)
