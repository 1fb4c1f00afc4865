"""Root pytest configuration shared by every test directory of the workspace.

Without CUDA, Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, set before any
kernel module is imported), and tests marked ``gpu`` are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
