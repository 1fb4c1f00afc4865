"""``seqmem_shared.train.curves``: metrics.jsonl reading and the within-noise comparison of two curves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from seqmem_shared.train.curves import compare_curves, curve_noise, read_metrics


def _curve(seed: int, sigma: float, offset: float = 0.0, n: int = 200) -> dict[int, float]:
    """An exponentially decaying loss plus Gaussian noise, logged every 10 steps."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(1, n + 1) * 10
    values = 1.0 + 3.0 * torch.exp(-steps / 300.0) + sigma * torch.randn(n, generator=g) + offset
    return {int(s): float(v) for s, v in zip(steps, values)}


def test_noise_estimate_recovers_the_added_noise_despite_the_trend():
    values = torch.tensor(list(_curve(0, sigma=0.05, n=2000).values()), dtype=torch.float64)
    assert curve_noise(values) == pytest.approx(0.05, rel=0.1)
    assert curve_noise(torch.linspace(0, 1, 50, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-12)


def test_two_noisy_copies_agree_and_an_offset_or_other_shape_does_not():
    a, b = _curve(1, sigma=0.05), _curve(2, sigma=0.05)
    same = compare_curves(a, b)
    assert same.agree and same.common_steps == 200 and same.ratio < 1.5
    assert same.noise == pytest.approx(0.05 * math.sqrt(2), rel=0.2)
    shifted = compare_curves(a, _curve(2, sigma=0.05, offset=0.2))
    assert not shifted.agree and shifted.mean_diff == pytest.approx(-0.2, abs=0.02)
    later = {s: 1.0 + 3.0 * math.exp(-s / 600.0) for s in a}  # slower descent, no noise
    assert not compare_curves(a, later).agree


def test_only_common_steps_count_and_skip_fraction_drops_the_start():
    a = {s: float(s % 3) for s in range(0, 100, 10)}
    b = {s: float(s % 3) for s in range(0, 200, 5)}
    result = compare_curves(a, b)
    assert (result.common_steps, result.first_step, result.last_step) == (10, 0, 90)
    assert result.rms_diff == 0 and result.agree
    assert compare_curves(a, b, skip_fraction=0.5).first_step == 50
    with pytest.raises(ValueError, match="at least 3 common logged steps"):
        compare_curves(a, {0: 1.0, 10: 1.0})
    with pytest.raises(ValueError, match="skip_fraction"):
        compare_curves(a, b, skip_fraction=1.0)


def test_read_metrics_keeps_the_last_record_per_step_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 10, "loss": 2.0}, {"step": 10, "eval_accuracy": 0.5}, {"step": 20, "loss": 1.5},
               {"step": 20, "loss": 1.25}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_metrics(path) == {10: 2.0, 20: 1.25}
    assert read_metrics(path, "eval_accuracy") == {10: 0.5}
    path.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(path)
