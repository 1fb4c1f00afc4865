"""The gated associative scan: doubling reference == sequential loop; module semantics."""

from __future__ import annotations

import pytest
import torch
from titans_pytorch.ops.assoc_scan import AssocScan, assoc_scan, assoc_scan_loop, assoc_scan_reference


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("with_prev", [False, True])
def test_reference_matches_loop(n, with_prev):
    g = torch.Generator().manual_seed(n)
    gates = torch.rand(3, n, 5, generator=g)
    gates[:, ::3] = 0.0  # exact zeros must not break anything (no division)
    inputs = torch.randn(3, n, 5, generator=g)
    prev = torch.randn(3, 5, generator=g) if with_prev else None
    torch.testing.assert_close(
        assoc_scan_reference(gates, inputs, prev), assoc_scan_loop(gates, inputs, prev)
    )


def test_broadcast_gates_over_weight_shapes():
    gates = torch.rand(2, 9, 1, 1)
    inputs = torch.randn(2, 9, 4, 3)
    torch.testing.assert_close(assoc_scan(gates, inputs, backend="torch"), assoc_scan_loop(gates, inputs))


def test_module_chaining_and_remove_prev():
    scan = AssocScan()
    gates, inputs = torch.rand(2, 128, 16), torch.randn(2, 128, 16)
    full = scan(gates, inputs)
    first = scan(gates[:, :64], inputs[:, :64])
    second = scan(gates[:, 64:], inputs[:, 64:], prev=first[:, -1])
    torch.testing.assert_close(torch.cat((first, second), 1), full, atol=1e-5, rtol=1e-5)
    with_prev = scan(gates[:, 64:], inputs[:, 64:], prev=first[:, -1], remove_prev=False)
    assert with_prev.shape == (2, 65, 16)
    torch.testing.assert_close(with_prev[:, 0], first[:, -1])


def test_bad_backend_is_one_line_error():
    with pytest.raises(ValueError, match="backend="):
        assoc_scan(torch.rand(1, 2, 1), torch.rand(1, 2, 1), backend="cuda")
