"""GPU checks (``-m gpu``): the fast paths agree with the references; a bf16 step of the default model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from polar_mem_mamba import Config
from polar_mem_mamba.data import MQARBatches
from polar_mem_mamba.ops.attention import attention, attention_reference
from polar_mem_mamba.ops.conv import causal_conv1d, causal_conv1d_reference
from polar_mem_mamba.ops.ssd import load_chunk_scan, ssd, ssd_chunked
from polar_mem_mamba.train import build_model, mqar_loss

pytestmark = pytest.mark.gpu


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-2) -> None:
    """Relative error in norm (Triton kernels may use TF32 matmuls: elementwise fp32 bounds do not fit)."""
    err = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.mark.parametrize("length", [64, 275])
def test_mamba_ssm_matches_reference_forward_and_backward(length):
    _need("mamba_ssm")
    assert load_chunk_scan() is not None, "mamba_ssm is installed but its SSD kernel does not load"
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, g, n = 2, 4, 64, 1, 64
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
    leaves = dict(x=r(b, length, h, p), dt=r(b, length, h), B=r(b, length, g, n), C=r(b, length, g, n))
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    A = -torch.rand(h, device="cuda", generator=gen) * 4
    extra = dict(D=torch.ones(h, device="cuda"), dt_bias=torch.zeros(h, device="cuda"), dt_softplus=True)
    grad_out = r(b, length, h, p)
    results = []
    for backend in ("mamba_ssm", "torch"):
        y = ssd(**leaves, A=A, chunk_size=64, backend=backend, **extra)
        grads = torch.autograd.grad((y * grad_out).sum(), list(leaves.values()))
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    _close(y1, y2)
    for a, c in zip(g1, g2):
        _close(a, c)
    torch.testing.assert_close(ssd_chunked(**leaves, A=A, chunk_size=64, **extra), y2)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backends_agree(causal):
    _need("flash_attn")
    q, k, v = (torch.randn(2, 96, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fast = attention(q, k, v, causal=causal, backend="flash_attn")
    torch.testing.assert_close(fast, attention_reference(q, k, v, causal=causal), rtol=2e-2, atol=2e-2)


def test_causal_conv1d_backends_agree():
    _need("causal_conv1d")
    x = torch.randn(2, 640, 100, device="cuda")
    w, bias = torch.randn(640, 4, device="cuda"), torch.randn(640, device="cuda")
    torch.testing.assert_close(causal_conv1d(x, w, bias, backend="causal_conv1d"),
                               causal_conv1d_reference(x, w, bias), rtol=1e-4, atol=1e-4)


def test_bf16_training_step_of_the_default_model_is_finite():
    config = Config(batch_size=32)
    model = build_model(config, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=True)
    batch = MQARBatches(config, config.batch_size, "cuda")(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, metrics = mqar_loss(config)(model, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    assert torch.isfinite(loss) and torch.isfinite(norm) and 0 < loss.item() < 20
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ["mamba2", "hybrid"])
def test_model_fast_path_matches_reference(arch):
    """The whole model with backend=auto (mamba_ssm, causal_conv1d, flash_attn, Triton) == backend=torch."""
    config = Config(architecture=arch, d_model=128, d_state=32, encoder_layers=2, decoder_layers=3,
                    cross_attn_layers=(0, 2), num_pairs=32, num_queries=8, precision="fp32")
    reference = build_model(config.replace(backend="torch"), device="cuda")
    fast = build_model(config, device="cuda")
    fast.load_state_dict(reference.state_dict())
    batch = MQARBatches(config, 4, "cuda")(0)
    with torch.no_grad():
        a = reference(batch["encoder_ids"], batch["decoder_ids"])
        b = fast(batch["encoder_ids"], batch["decoder_ids"])
    _close(b, a)
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() > 0.99
