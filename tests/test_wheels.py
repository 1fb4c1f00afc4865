"""Every workspace member builds as a wheel that works outside the workspace.

Each wheel is installed into a fresh virtual environment with only its declared dependencies
(seqmem-shared from its own freshly built wheel, versions pinned to uv.lock), then every module
of the package is imported and each console script answers ``--help``. A package that only works
inside the workspace (an undeclared dependency, a data file missing from the wheel) fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = {
    "seqmem-shared": "seqmem_shared",
    "polar-mem-mamba": "polar_mem_mamba",
    "titans-pytorch": "titans_pytorch",
    "bilinear-toys": "bilinear_toys",
    "retnet-forgetting": "retnet_forgetting",
}

# Runs inside the fresh venv: import every module, then call each console script with --help.
PROBE = r"""
import importlib, importlib.metadata as md, pkgutil, subprocess, sys, os
dist, pkg = sys.argv[1], sys.argv[2]
root = importlib.import_module(pkg)
for info in pkgutil.walk_packages(root.__path__, pkg + "."):
    importlib.import_module(info.name)
bindir = os.path.dirname(sys.executable)
for ep in md.distribution(dist).entry_points:
    if ep.group == "console_scripts":
        out = subprocess.run([os.path.join(bindir, ep.name), "--help"], capture_output=True, text=True)
        assert out.returncode == 0, f"{ep.name} --help failed: {out.stderr[-2000:]}"
print("ok", dist)
"""

uv = shutil.which("uv")
pytestmark = pytest.mark.skipif(uv is None, reason="needs uv on PATH")


def _run(*cmd: str | Path, cwd: Path = ROOT) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    what = " ".join(map(str, cmd))
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dist = tmp_path_factory.mktemp("dist")
    _run(uv, "build", "--all-packages", "--wheel", "--out-dir", dist)
    found = {}
    for name in MEMBERS:
        matches = sorted(dist.glob(name.replace("-", "_") + "-*.whl"))
        assert matches, f"no wheel built for {name}: {sorted(p.name for p in dist.iterdir())}"
        found[name] = matches[-1]
    return found


@pytest.fixture(scope="module")
def constraints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uv.lock's versions as pip constraints, so fresh installs reuse the locked (cached) wheels."""
    path = tmp_path_factory.mktemp("lock") / "constraints.txt"
    text = _run(uv, "export", "--frozen", "--no-hashes", "--all-packages", "--no-emit-workspace",
                "--no-header", "--no-annotate")
    path.write_text(text)
    return path


@pytest.mark.parametrize("dist", list(MEMBERS))
def test_wheel_installs_and_imports_alone(dist: str, wheels: dict[str, Path], constraints: Path,
                                          tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(uv, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    reqs = [wheels["seqmem-shared"]] + ([wheels[dist]] if dist != "seqmem-shared" else [])
    _run(uv, "pip", "install", "--quiet", "--python", python, "--constraint", constraints, *reqs)
    out = _run(python, "-c", PROBE, dist, MEMBERS[dist], cwd=tmp_path)
    assert out.strip().endswith(f"ok {dist}")
