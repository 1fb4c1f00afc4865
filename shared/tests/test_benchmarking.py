"""seqmem_shared.benchmarking on CPU (perf_counter path); the CUDA-event path is a gpu test."""

from __future__ import annotations

import json
import time

import pytest
import torch
from seqmem_shared.benchmarking import (
    Timing,
    copy_bandwidth_gbps,
    environment,
    measure,
    median_ms,
    peak_memory,
    print_json,
    short_error,
)


def test_measure_counts_calls_resets_grads_and_takes_the_median():
    calls, durations = [], iter([0.0] * 2 + [0.03, 0.001, 0.01])  # warmup, then three timed calls
    x = torch.ones(2, requires_grad=True)

    def fn():
        assert x.grad is None  # reset before every call
        calls.append(1)
        time.sleep(next(durations))
        (x * 2).sum().backward()

    t = measure(fn, warmup=2, reps=3, device="cpu", grad_to_none=[x])
    assert len(calls) == 5 and t.reps == 3 and x.grad is None
    assert 1.0 <= t.min_ms < t.median_ms < t.max_ms and 10.0 <= t.median_ms < 30.0 <= t.max_ms
    assert set(t.as_dict()) == {"median_ms", "min_ms", "max_ms", "reps"}
    assert isinstance(t, Timing) and median_ms(lambda: None, warmup=0, reps=4, device="cpu") >= 0.0
    with pytest.raises(ValueError, match="reps >= 1"):
        measure(lambda: None, reps=0, device="cpu")


def test_peak_memory_is_none_off_cuda_but_runs_fn():
    ran = []
    assert peak_memory(lambda: ran.append(1), device="cpu") is None and ran == [1]


def test_copy_bandwidth_environment_and_output(tmp_path, capsys):
    assert copy_bandwidth_gbps(2**20, device="cpu") > 0
    env = environment("pytest", "no-such-dist", device="cpu")
    assert {"date", "device", "torch", "cuda", "triton", "python", "pytest", "no_such_dist"} <= set(env)
    assert env["torch"] == torch.__version__ and env["no_such_dist"] == "unavailable"
    assert env["pytest"] == pytest.__version__ and len(env["date"]) == 10 and env["device"] == "cpu"
    print_json({"a": 1, **env}, tmp_path / "r.json")
    assert json.loads(capsys.readouterr().out)["a"] == 1
    assert json.loads((tmp_path / "r.json").read_text())["python"] == env["python"]
    assert short_error(RuntimeError("out of memory\nmore")) == "RuntimeError: out of memory"


@pytest.mark.gpu
def test_cuda_events_and_peak_memory():
    a = torch.randn(2048, 2048, device="cuda")
    t = measure(lambda: a @ a, warmup=2, reps=5, flush_l2=True)
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms
    peak = peak_memory(lambda: torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda"))
    assert peak.extra_bytes >= 64 * 2**20 and peak.peak_bytes >= peak.extra_bytes
    assert copy_bandwidth_gbps(2**26) > 10 and environment()["device"] == torch.cuda.get_device_name()
