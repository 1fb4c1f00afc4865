"""NeuralMemory: shapes, dual form == reference, parallel == sequential, chaining, gradients, defects."""

from __future__ import annotations

import pytest
import torch
from titans_pytorch import (
    FactorizedMemoryMLP,
    GatedResidualMemoryMLP,
    MemoryAttention,
    MemoryMLP,
    MemorySwiGluMLP,
    NeuralMemory,
    NeuralMemState,
    mem_state_detach,
)
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb(mem: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Move learnable parameters off their (mostly zero/symmetric) init so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mem.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return mem


def _sequential(mem, x, mask=None, state=None):
    outs = []
    for t in range(x.shape[1]):
        out, state = mem(x[:, t], state=state, store_mask=None if mask is None else mask[:, t : t + 1])
        outs.append(out)
    return torch.cat(outs, 1), state


CONFIGS = {
    "default": dict(),
    "heads": dict(heads=2, dim_head=8, qk_rmsnorm=True, post_rmsnorm=True),
    "momentum2_combine": dict(
        momentum_order=2, learned_momentum_combine=True, learned_combine_include_zeroth=True
    ),
    "clamp_layer_lr": dict(max_grad_norm=0.3, per_parameter_lr_modulation=True, attn_pool_chunks=True),
    "batch_gated": dict(batch_size=8, gated_transition=True),
    "kv2_nomomentum": dict(num_kv_per_token=2, momentum=False, activation=nn.SiLU()),
    "no_residual_norm": dict(mem_model_norm_add_residual=False, default_model_kwargs=dict(depth=3)),
    "shared_head_params": dict(heads=2, dim_head=8, per_head_learned_parameters=False),
    "split_chunks": dict(chunk_size=(2, 4)),
    "lookahead": dict(store_with_lookahead_value=True, num_kv_per_token=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dual_form_equals_reference(name):
    kw = dict(chunk_size=4) | CONFIGS[name]
    mem = _perturb(NeuralMemory(16, **kw))
    x = torch.randn(2, 23, 16)
    mask = torch.rand(2, 23) > 0.3
    mem.engine = "reference"
    ref, ref_state, (ref_loss, ref_lr) = mem(x, store_mask=mask, return_surprises=True)
    mem.engine = "dual"
    out, state, (loss, lr) = mem(x, store_mask=mask, return_surprises=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for k in ref_state.states[0]:
        torch.testing.assert_close(state.states[0][k], ref_state.states[0][k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.weights[k], ref_state.weights[k], atol=1e-5, rtol=1e-5)


def test_dual_lazy_updates_match_reference_rows():
    mem = _perturb(NeuralMemory(16, chunk_size=4, batch_size=8))
    x = torch.randn(2, 20, 16)
    mem.engine = "reference"
    _, ref = mem(x)
    mem.engine = "dual"
    _, dual = mem(x)
    for k in ref.updates:
        assert dual.updates[k].shape == ref.updates[k].shape == (2, 6, *ref.states[0][k].shape[1:])
        torch.testing.assert_close(dual.updates[k], ref.updates[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["default", "heads", "momentum2_combine", "batch_gated", "kv2_nomomentum"])
@pytest.mark.parametrize("engine", ["dual", "reference"])
def test_parallel_equals_sequential(name, engine):
    kw = dict(chunk_size=4) | CONFIGS[name]
    mem = _perturb(NeuralMemory(16, engine=engine, **kw), seed=1)
    x = torch.randn(2, 19, 16)
    mask = torch.rand(2, 19) > 0.2
    parallel, pstate = mem(x, store_mask=mask)
    sequential, sstate = _sequential(mem, x, mask)
    torch.testing.assert_close(sequential, parallel, atol=1e-5, rtol=1e-5)
    assert sstate.seq_index == pstate.seq_index == 16


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("batch_size", [None, 24])
def test_parallel_equals_sequential_chunk_and_batch_sizes(chunk_size, batch_size):
    mem = _perturb(NeuralMemory(8, chunk_size=chunk_size, batch_size=batch_size), seed=2)
    x = torch.randn(1, 30, 8)
    parallel, _ = mem(x)
    sequential, _ = _sequential(mem, x)
    torch.testing.assert_close(sequential, parallel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        lambda: MemoryMLP(8, depth=1),
        lambda: FactorizedMemoryMLP(8, depth=2, k=4),
        lambda: GatedResidualMemoryMLP(8, depth=1, expansion_factor=2.0),
        lambda: MemorySwiGluMLP(8, depth=1),
    ],
    ids=["mlp1", "factorized", "gated_residual", "swiglu"],
)
def test_memory_models_parallel_equals_sequential(model):
    mem = NeuralMemory(8, chunk_size=2, batch_size=4, model=model(), default_step_transform_max_lr=0.1)
    mem = _perturb(mem, seed=3)
    x = torch.randn(2, 11, 8)
    parallel, _ = mem(x)
    assert parallel.shape == x.shape
    sequential, _ = _sequential(mem, x)
    torch.testing.assert_close(sequential, parallel, atol=1e-5, rtol=1e-5)


def test_attention_memory_shape():
    mem = NeuralMemory(16, chunk_size=8, model=MemoryAttention(16))
    x = torch.randn(2, 40, 16)
    out, _ = mem(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("splits", [(16, 16, 16), (1, 4, 30, 13)])
@pytest.mark.parametrize("batch_size", [None, 16])
def test_state_chaining_equals_one_call(splits, batch_size):
    mem = _perturb(
        NeuralMemory(16, dim_head=8, heads=2, chunk_size=4, batch_size=batch_size, gated_transition=True)
    )
    x = torch.randn(2, 48, 16)
    whole, whole_state = mem(x)
    state, outs = None, []
    for part in x.split(list(splits), dim=1):
        out, state = mem(part, state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-5, rtol=1e-5)
    for k in whole_state.states[0]:
        torch.testing.assert_close(state.states[0][k], whole_state.states[0][k], atol=1e-5, rtol=1e-5)


def test_weight_residual_chaining():
    mem = _perturb(NeuralMemory(16, dim_head=16, heads=2, chunk_size=8))
    mem2 = _perturb(NeuralMemory(16, dim_head=16, heads=2, chunk_size=8, accept_weight_residual=True), seed=5)
    x = torch.randn(2, 64, 16)
    seq, state = mem(x)
    whole, _ = mem2(seq, prev_weights=state.updates)
    first, s1 = mem2(seq[:, :32], prev_weights=state.updates)
    second, _ = mem2(seq[:, 32:], state=s1, prev_weights=state.updates)
    torch.testing.assert_close(torch.cat((first, second), 1), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prev_weights"):
        mem2(seq)


def test_shapes_surprises_and_single_token():
    mem = NeuralMemory(32, chunk_size=2, dim_head=8, heads=4, num_kv_per_token=2)
    x = torch.randn(3, 10, 32)
    out, state, (loss, lr) = mem(x, return_surprises=True)
    assert out.shape == x.shape
    assert loss.shape == lr.shape == (3, 4, 20)
    assert isinstance(state, NeuralMemState) and state.seq_index == 10
    one, state = mem(torch.randn(3, 32), state=state)
    assert one.shape == (3, 1, 32) and state.cache_store_segment.shape == (3, 1, 32)


def test_gradients_reach_every_learnable_parameter():
    mem = NeuralMemory(
        16,
        chunk_size=2,
        dim_head=8,
        heads=2,
        batch_size=4,
        qk_rmsnorm=True,
        post_rmsnorm=True,
        per_parameter_lr_modulation=True,
        max_grad_norm=1.0,
        attn_pool_chunks=True,
        momentum_order=2,
        learned_momentum_combine=True,
        gated_transition=True,
    )
    _perturb(mem)
    out, _ = mem(torch.randn(2, 12, 16))
    out.square().mean().backward()
    missing = [
        n for n, p in mem.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing
    assert not any(p.requires_grad for p in mem.memory_model.parameters())


@pytest.mark.parametrize("engine", ["dual", "reference"])
def test_zero_gradients_with_grad_clamp_stay_finite(engine):
    """titans-pytorch divides by a zero gradient norm here and returns NaN."""
    mem = NeuralMemory(16, chunk_size=2, max_grad_norm=1.0, engine=engine)
    x = torch.randn(2, 8, 16)
    out, state = mem(x, store_mask=torch.zeros(2, 8, dtype=torch.bool))
    assert torch.isfinite(out).all()
    for k, w in state.states[0].items():
        assert torch.isfinite(w).all(), k


def test_per_head_initial_weights_are_independent():
    """titans-pytorch's per-head weights are expanded views of one storage (stride 0 on the head axis)."""
    mem = NeuralMemory(16, dim_head=8, heads=2, chunk_size=2)
    for p in mem.memory_model_parameters:
        assert p.stride(0) != 0
        with torch.no_grad():
            p[0].add_(1.0)
        assert not torch.equal(p[0], p[1])


def test_mem_state_detach_allows_repeated_backward():
    mem = NeuralMemory(16, chunk_size=2, dim_head=8, heads=2, qk_rmsnorm=True)
    state = None
    for _ in range(2):
        out, state = mem(torch.randn(2, 9, 16), state=state)
        state = mem_state_detach(state)
        out.sum().backward()
    assert all(not t.requires_grad for t in state.states[0].values())
    with pytest.raises(TypeError, match="NeuralMemState"):
        mem_state_detach((0, None))


def test_bad_config_is_one_line_error():
    with pytest.raises(ValueError, match="batch_size"):
        NeuralMemory(16, chunk_size=4, batch_size=6)
    with pytest.raises(ValueError, match="dim_head"):
        NeuralMemory(16, heads=1, dim_head=8)
    with pytest.raises(ValueError, match="engine='dual'"):
        NeuralMemory(16, model=MemoryAttention(16), engine="dual")
