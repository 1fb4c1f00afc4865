"""The GitHub Actions workflows pass actionlint, and CI covers every workspace member."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_exist() -> None:
    assert WORKFLOWS, "no workflow under .github/workflows"


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint not installed (dev group)")
def test_actionlint_passes() -> None:
    out = subprocess.run(["actionlint", "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_matrix_covers_every_member_on_cpu_and_gpu() -> None:
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    matrix = ci["jobs"]["test"]["strategy"]["matrix"]
    packages = (ROOT / "packages").iterdir()
    members = {"seqmem-shared"} | {p.name for p in packages if (p / "pyproject.toml").exists()}
    assert set(matrix["package"]) == members
    assert set(matrix["device"]) == {"cpu", "gpu"}
    gpu = next(i for i in matrix["include"] if i.get("device") == "gpu")
    assert "gpu" in gpu["runner"] and "self-hosted" in gpu["runner"]
