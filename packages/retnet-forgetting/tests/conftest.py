"""Tests of retnet-forgetting use tiny tensors: one intra-op thread is faster (and fair to parallel jobs)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
