"""GPU checks (``-m gpu``): FlexAttention == explicit mask, accelerated scan == reference, dual == reference
on CUDA, and a finite bf16 MAC training step."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from titans_pytorch import MemoryAsContextTransformer, MemoryMLP, NeuralMemory
from titans_pytorch.attention import SegmentedAttention, flex_attention_available
from titans_pytorch.ops.assoc_scan import assoc_scan, assoc_scan_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seq_len", [17, 200, 1023])
@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("with_memory", [False, True])
def test_flex_equals_explicit_mask(seq_len, sliding, with_memory):
    if not flex_attention_available():
        pytest.skip("FlexAttention unavailable")
    torch.manual_seed(0)
    attn = SegmentedAttention(
        32,
        segment_len=32,
        num_persist_mem_tokens=4,
        dim_head=16,
        heads=2,
        sliding=sliding,
        use_flex_attn=True,
    ).cuda()
    x = torch.randn(2, seq_len, 32, device="cuda")
    mem = torch.randn(2, seq_len, 32, device="cuda") if with_memory else None
    flex, _ = attn(x, memory=mem)
    explicit, _ = attn(x, memory=mem, disable_flex_attn=True)
    torch.testing.assert_close(flex, explicit, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("n", [1, 33, 1000])
def test_accelerated_scan_equals_reference(n):
    if importlib.util.find_spec("accelerated_scan") is None:
        pytest.skip("accelerated-scan not installed")
    torch.manual_seed(0)
    gates = torch.rand(3, n, 4, 5, device="cuda")
    inputs = torch.randn(3, n, 4, 5, device="cuda")
    prev = torch.randn(3, 4, 5, device="cuda")
    fast = assoc_scan(gates, inputs, prev, backend="triton")
    torch.testing.assert_close(fast, assoc_scan_reference(gates, inputs, prev), atol=1e-5, rtol=1e-5)


def test_dual_equals_reference_on_cuda():
    torch.manual_seed(0)
    mem = NeuralMemory(
        64, chunk_size=8, batch_size=32, heads=2, dim_head=32, qk_rmsnorm=True, max_grad_norm=1.0
    ).cuda()
    x = torch.randn(2, 100, 64, device="cuda")
    mem.engine = "reference"
    ref, _ = mem(x)
    mem.engine = "dual"
    out, _ = mem(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_mac_training_step_is_finite():
    torch.manual_seed(0)
    model = MemoryAsContextTransformer(
        num_tokens=256,
        dim=128,
        depth=4,
        segment_len=32,
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4,
        neural_memory_layers=(2, 4),
        neural_memory_segment_len=4,
        neural_memory_batch_size=64,
        neural_memory_model=MemoryMLP(dim=32, depth=2),
        sliding_window_attn=True,
        use_flex_attn=flex_attention_available(),
        neural_memory_kwargs=dict(dim_head=32, heads=4, qk_rmsnorm=True, momentum=True),
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (2, 257), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data, return_loss=True)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
