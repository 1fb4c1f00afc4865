"""GPU checks (``-m gpu``): FlexAttention == explicit mask, accelerated scan == reference, dual == reference
on CUDA, compiled dual form == eager, CUDA-graph TrainStep and graphed_memory == eager, and a finite bf16
MAC step."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from titans_pytorch import MemoryAsContextTransformer, MemoryMLP, NeuralMemory, TrainStep, graphed_memory
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


@pytest.mark.slow  # compiles three functions forward and backward (tens of seconds)
def test_compiled_dual_equals_eager_on_cuda():
    torch.manual_seed(0)
    mem = NeuralMemory(64, chunk_size=8, batch_size=32, heads=2, dim_head=32, max_grad_norm=1.0).cuda()
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    mem.compile = False
    ref, _ = mem(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    mem.compile = True
    out, _ = mem(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-3)


def test_cuda_graph_train_step_equals_eager():
    # The flex tests above compile flex_attention for 12 mask/shape variants, past dynamo's recompile
    # limit; flex then runs its unfused eager fallback, which cannot be captured. Start from a clean cache.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MemoryAsContextTransformer(
        num_tokens=256,
        dim=64,
        depth=2,
        segment_len=16,
        num_persist_mem_tokens=4,
        neural_memory_layers=(1, 2),
        neural_memory_segment_len=4,
        neural_memory_batch_size=32,
        neural_memory_model=MemoryMLP(dim=16, depth=2),
        sliding_window_attn=True,
        use_flex_attn=flex_attention_available(),
        neural_memory_kwargs=dict(dim_head=16, heads=4, qk_rmsnorm=True, compile=False),
    ).cuda()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, max_grad_norm=0.5, autocast_dtype=None)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    data = torch.randint(0, 256, (6, 2, 129), device="cuda")
    for i, batch in enumerate(data):
        loss = step(batch)
        ref_loss = ref(batch, return_loss=True)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-4, rtol=1e-4, msg=f"step {i}")
    assert step.graphed
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_memory_equals_eager(bf16):
    """fp32: the replayed graph equals the eager call. bf16: graph capture may pick other cuBLAS kernels,
    so both are compared with the fp32 eager result and the graph may not be clearly worse than eager."""
    torch.manual_seed(0)
    mem = NeuralMemory(64, chunk_size=8, batch_size=32, heads=2, dim_head=32, qk_rmsnorm=True).cuda()
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    with torch.autocast(**autocast):
        read = graphed_memory(mem, torch.randn(2, 100, 64, device="cuda"))
    params = [p for p in mem.parameters() if p.requires_grad]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    for _ in range(2):  # replays see new inputs
        x = torch.randn(2, 100, 64, device="cuda")
        with torch.autocast(**autocast):
            out = read(x).float()
            ref = mem(x)[0].float()
        grads = torch.autograd.grad(out.square().sum(), params)
        ref_grads = torch.autograd.grad(ref.square().sum(), params)
        if not bf16:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
            continue
        exact = mem(x)[0]
        exact_grads = torch.autograd.grad(exact.square().sum(), params)
        assert rel(out, exact) <= 2 * rel(ref, exact) + 1e-3
        for g, r, e in zip(grads, ref_grads, exact_grads):
            assert rel(g, e) <= 2 * rel(r, e) + 1e-3, (rel(g, e), rel(r, e))
