"""SSD: the chunked reference equals the token recurrence (values, final states, gradients); dispatch."""

from __future__ import annotations

import pytest
import torch
from polar_mem_mamba.ops.ssd import ssd, ssd_backend, ssd_chunked, ssd_recurrent


def _inputs(b=2, length=37, h=4, p=8, g=2, n=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return dict(x=r(b, length, h, p), dt=r(b, length, h), A=-torch.rand(h, generator=gen, dtype=dtype) * 4,
                B=r(b, length, g, n), C=r(b, length, g, n))


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("extras", ["plain", "full"])
def test_chunked_matches_recurrence(chunk_size, extras):
    inp = _inputs()
    kw = {}
    if extras == "full":
        gen = torch.Generator().manual_seed(1)
        kw = dict(D=torch.randn(4, 8, generator=gen, dtype=torch.float64),
                  z=torch.randn(2, 37, 4, 8, generator=gen, dtype=torch.float64),
                  dt_bias=torch.randn(4, generator=gen, dtype=torch.float64),
                  initial_states=torch.randn(2, 4, 8, 16, generator=gen, dtype=torch.float64),
                  dt_softplus=True, dt_limit=(0.01, 2.0))
    else:
        inp["dt"] = inp["dt"].abs()
    y1, s1 = ssd_chunked(**inp, chunk_size=chunk_size, return_final_states=True, **kw)
    y2, s2 = ssd_recurrent(**inp, chunk_size=chunk_size, return_final_states=True, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
    assert y1.dtype == torch.float64 and y1.shape == inp["x"].shape and s1.shape == (2, 4, 8, 16)


def test_gradients_match_recurrence():
    inp = {k: v.float().requires_grad_() for k, v in _inputs(length=20).items()}
    bias = torch.zeros(4, requires_grad=True)
    outs = []
    for fn in (ssd_chunked, ssd_recurrent):
        y = fn(**inp, chunk_size=8, D=torch.ones(4), dt_bias=bias, dt_softplus=True)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [*inp.values(), bias])
        outs.append(grads)
    for g1, g2 in zip(*outs):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4)


def test_state_carries_across_calls():
    """Running two halves with the first half's final state equals running the whole sequence."""
    inp = _inputs(length=32)
    inp["dt"] = inp["dt"].abs()
    whole = ssd_chunked(**inp, chunk_size=8)
    first = {k: v[:, :12] for k, v in inp.items() if k != "A"}
    second = {k: v[:, 12:] for k, v in inp.items() if k != "A"}
    y1, s1 = ssd_chunked(**first, A=inp["A"], chunk_size=8, return_final_states=True)
    y2 = ssd_chunked(**second, A=inp["A"], chunk_size=8, initial_states=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_dispatch_on_cpu_uses_the_reference():
    inp = {k: v.float() for k, v in _inputs().items()}
    assert ssd_backend("auto", inp["x"]) == "torch"
    torch.testing.assert_close(ssd(**inp, chunk_size=16), ssd_chunked(**inp, chunk_size=16))
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        ssd(**inp, chunk_size=16, backend="mamba_ssm")
    with pytest.raises(ValueError, match="backend='fast'"):
        ssd(**inp, chunk_size=16, backend="fast")


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_recurrent])
def test_scan_stays_fp32_under_autocast(fn):
    """Autocast would run the scan's einsums in bf16 whatever their inputs' dtype (~1e-2 off, and it
    slowed MQAR training several-fold); the reference turns it off, like mamba_ssm's fp32 kernel."""
    inp = {k: v.float() for k, v in _inputs().items()}
    inp["dt"] = inp["dt"].abs()
    plain = fn(**inp, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fn(**inp, chunk_size=8)
        unguarded = fn.__wrapped__(**inp, chunk_size=8)  # the same scan with autocast left on
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=1e-6, atol=1e-6)
    assert (unguarded.float() - plain).norm() / plain.norm() > 1e-3  # what the guard prevents
