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
    """Two full bf16 steps of the default model. The first one also compiles and autotunes the Triton
    kernels (tens of seconds on a fresh machine: run this test without a short per-test timeout)."""
    config = Config(batch_size=32)
    model = build_model(config, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=True)
    loss_fn = mqar_loss(config)
    for index in range(2):
        batch = MQARBatches(config, config.batch_size, "cuda")(index)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss) and torch.isfinite(norm) and 0 < loss.item() < 20, (index, loss, norm)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_lockstep_cuda_graphs_match_eager(tmp_path, backend):
    """Replaying captured training steps (polar_mem_mamba.lockstep) gives the eager run's weights."""
    from polar_mem_mamba.lockstep import WARMUP_STEPS, train_lockstep

    base = Config(d_model=64, d_state=8, headdim=32, encoder_layers=2, decoder_layers=2,
                  cross_attn_layers=(0,), mem_pool_size=8, mem_summary_dim=16, mem_update_freq=2,
                  num_pairs=16, num_queries=4, vocab_size=256, batch_size=32, max_steps=WARMUP_STEPS + 5,
                  warmup_steps=2, eval_every=0, eval_examples=64, log_every=4, save_every=0, progress=False,
                  precision="fp32", backend=backend)
    configs = [base.replace(architecture=arch, learning_rate=lr, run_name=f"{arch}-{lr}")
               for arch, lr in (("polar_pool", 3e-3), ("hybrid", 1e-3), ("attention", 3e-3))]
    results = {}
    for graphs in (False, True):
        out = str(tmp_path / str(graphs))
        results[graphs] = train_lockstep([c.replace(out_dir=out) for c in configs], graphs=graphs)
    for (eager, _), (graphed, metrics) in zip(results[False], results[True]):
        assert metrics["cuda_graph"] is True
        for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
            if a.is_floating_point() and a.norm() > 0:
                _close(b, a, tol=1e-3)
            else:
                torch.testing.assert_close(b, a)


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
