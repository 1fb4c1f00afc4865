"""Backend selection, optional imports, atomic writes and the seqmem-check report."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from seqmem_shared import backends, check, io


def test_auto_picks_reference_for_cpu_tensors() -> None:
    assert backends.resolve_backend("auto", torch.zeros(2)) == "torch"
    assert backends.resolve_backend("torch", torch.zeros(2)) == "torch"


def test_default_device_is_cuda_when_available(monkeypatch) -> None:
    assert backends.default_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.default_device() == torch.device("cuda")


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="backend='cuda'.*'auto', 'torch', 'triton'"):
        backends.resolve_backend("cuda", torch.zeros(1))


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.triton_status.cache_clear()
    try:
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        with pytest.raises(RuntimeError, match="triton"):
            backends.resolve_backend("triton", torch.zeros(1))
    finally:
        backends.triton_status.cache_clear()


def test_optional_import_logs_one_line_once(caplog: pytest.LogCaptureFixture) -> None:
    backends.optional_import.cache_clear()
    with caplog.at_level(logging.WARNING, logger="seqmem"):
        assert backends.optional_import("seqmem_no_such_module_xyz", "a test") is None
        assert backends.optional_import("seqmem_no_such_module_xyz", "a test") is None
    lines = [r.getMessage() for r in caplog.records if "seqmem_no_such_module_xyz" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "reference" in lines[0]
    assert backends.optional_import("json") is json


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "sub" / "result.json"
    io.atomic_write_json(target, {"accuracy": 0.5})

    def boom(path):
        path.write_text("half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_atomic_torch_save_roundtrip(tmp_path) -> None:
    path = io.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "ckpt.pt")
    assert torch.equal(torch.load(path)["w"], torch.arange(3))


def test_seqmem_check_reports_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert set(report["optional"]) >= {"triton", "fla", "flash_attn", "accelerated_scan.scalar"}
    for info in report["optional"].values():
        assert info["usable"] or info["why"]
    assert report["packages"]["seqmem-shared"]
    assert check.main([]) == 0
    assert "seqmem Triton kernels" in capsys.readouterr().out


def test_jsonl_records_skip_blank_lines_and_name_the_bad_line():
    from seqmem_shared.io import jsonl_records

    assert list(jsonl_records(['{"a": 1}', "  ", "[2]"], "x.jsonl")) == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(ValueError, match=r"^x.jsonl:2: invalid JSON \(Expecting value\)$"):
        list(jsonl_records(['{"a": 1}', "nope"], "x.jsonl"))


def test_without_autocast_keeps_fp32_products_and_the_signature():
    from seqmem_shared.backends import without_autocast

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b."""
        return a.float() @ b.float()

    guarded = without_autocast(product)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    exact = a @ b
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert product(a, b).dtype == torch.bfloat16  # what autocast does to the plain function
        assert torch.equal(guarded(a, b=b), exact)
        assert torch.is_autocast_enabled("cpu")  # restored after the call
    assert guarded.__doc__ == "a @ b." and guarded.__wrapped__ is product
