"""Fixtures for the tests of ``bench/`` scripts, which import each other as top-level modules."""

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(monkeypatch) -> Callable[[str], ModuleType]:
    """``bench(name)``: the script ``bench/{name}.py`` freshly imported, with ``bench/`` on ``sys.path`` as
    when it runs (spawned child processes inherit the path)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str) -> ModuleType:
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load
