"""TrainStep and graphed_memory (CUDA graphs) and the compiled dual form: CPU fallbacks and equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from titans_pytorch import MemoryAsContextTransformer, NeuralMemory, TrainStep, graphed_memory


def _tiny_mac(**mem_kwargs) -> MemoryAsContextTransformer:
    torch.manual_seed(0)
    return MemoryAsContextTransformer(
        num_tokens=64,
        dim=16,
        depth=2,
        segment_len=8,
        num_persist_mem_tokens=2,
        dim_head=8,
        heads=2,
        neural_memory_segment_len=4,
        neural_memory_batch_size=8,
        num_residual_streams=2,
        neural_memory_kwargs=dict(dim_head=8, heads=2, **mem_kwargs),
    )


def test_train_step_on_cpu_is_the_eager_step():
    model = _tiny_mac()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step = TrainStep(model, opt, max_grad_norm=0.5, autocast_dtype=None)
    data = torch.randint(0, 64, (5, 2, 25))
    for batch in data:
        loss = step(batch)
        ref_loss = ref(batch, return_loss=True)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert loss.shape == () and not loss.requires_grad
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    assert not step.graphed and step.calls == 5
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_train_step_rejects_bad_options():
    model = _tiny_mac()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="warmup"):
        TrainStep(model, opt, warmup=0)
    with pytest.raises(ValueError, match="CUDA batches"):
        TrainStep(model, opt, cuda_graph=True)(torch.randint(0, 64, (2, 9)))


def test_graphed_memory_on_cpu_is_the_eager_read():
    mem = NeuralMemory(16, chunk_size=4, heads=2, dim_head=8)
    x = torch.randn(2, 10, 16)
    read = graphed_memory(mem, x)
    out = read(x)
    torch.testing.assert_close(out, mem(x)[0], rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad is not None for p in mem.memory_model_parameters)


def test_compile_is_opt_in():
    from titans_pytorch.ops.compiled import maybe_compiled
    from titans_pytorch.ops.mlp_memory import mlp_dual_read

    assert NeuralMemory(16, chunk_size=4).compile is False
    assert maybe_compiled(mlp_dual_read, False) is mlp_dual_read
    compiled = maybe_compiled(mlp_dual_read, True)
    assert compiled is not mlp_dual_read and compiled is maybe_compiled(mlp_dual_read, True)  # cached


@pytest.mark.slow
def test_compiled_dual_form_equals_eager_on_cpu():
    torch.manual_seed(0)
    mem = NeuralMemory(8, chunk_size=2, heads=2, dim_head=4, batch_size=4, max_grad_norm=0.5)
    x = torch.randn(1, 11, 8, requires_grad=True)
    mem.compile = False
    ref, _ = mem(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    mem.compile = True
    out, _ = mem(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
