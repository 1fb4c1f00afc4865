"""MemoryAsContextTransformer and SegmentedAttention: mask semantics, shapes, gradients, cached sampling."""

from __future__ import annotations

import pytest
import torch
from titans_pytorch import MemoryAsContextTransformer, MemoryMLP
from titans_pytorch.attention import SegmentedAttention, mac_mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mac(**kw):
    base = dict(
        num_tokens=64,
        dim=16,
        depth=2,
        segment_len=8,
        num_persist_mem_tokens=2,
        dim_head=8,
        heads=2,
        neural_memory_segment_len=4,
        num_residual_streams=2,
    )
    return MemoryAsContextTransformer(**(base | kw))


@pytest.mark.parametrize("sliding", [False, True])
def test_mac_mask_matches_definition(sliding):
    n, s, p = 12, 4, 2
    mask = mac_mask(torch.arange(n)[:, None], torch.arange(p + 2 * n)[None], n, s, p, True, sliding)
    for i in range(n):
        for kv in range(p + 2 * n):
            j = (kv - p) % n if kv >= p else None
            if j is None:
                want = True
            elif sliding:
                want = j <= i and i - j < s
            else:
                want = j <= i and i // s == j // s
            assert bool(mask[i, kv]) == want, (i, kv)


def test_attention_is_causal_and_uses_memory_tokens():
    attn = SegmentedAttention(16, segment_len=4, num_persist_mem_tokens=2, dim_head=8, heads=2, sliding=True)
    x, mem = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    out, _ = attn(x, memory=mem)
    x2, mem2 = x.clone(), mem.clone()
    x2[:, 6:] += 1.0
    mem2[:, 6:] += 1.0
    out2, _ = attn(x2, memory=mem2)
    torch.testing.assert_close(out[:, :6], out2[:, :6])  # the future does not leak
    mem3 = mem.clone()
    mem3[:, 5] += 1.0
    out3, _ = attn(x, memory=mem3)
    assert not torch.allclose(out3[:, 5], out[:, 5]) and torch.allclose(out3[:, :5], out[:, :5])


@pytest.mark.parametrize("seq_len", [17, 33])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(sliding_window_attn=True, neural_memory_batch_size=8, neural_mem_gate_attn_output=True),
        dict(
            neural_memory_qkv_receives_diff_views=True,
            neural_mem_weight_residual=True,
            num_longterm_mem_tokens=4,
        ),
        dict(neural_memory_layers=(), num_residual_streams=1),
    ],
    ids=["plain", "sliding_batch_gate", "views_weight_residual", "no_memory"],
)
def test_mac_shapes_and_loss(seq_len, options):
    model = _mac(**options)
    x = torch.randint(0, 64, (2, seq_len))
    assert model(x).shape == (2, seq_len, 64)
    loss = model(x, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_mac_gradients_reach_every_learnable_parameter():
    model = _mac(
        depth=3,
        neural_memory_qkv_receives_diff_views=True,
        neural_mem_weight_residual=True,
        neural_memory_batch_size=8,
        neural_memory_model=MemoryMLP(16, depth=2),
        neural_memory_kwargs=dict(qk_rmsnorm=True, momentum=True, default_step_transform_max_lr=0.1),
    )
    with torch.no_grad():  # zero-initialised gates/scales would hide paths from the check
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.add_(0.01)
    model(torch.randint(0, 64, (2, 24)), return_loss=True).backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing


@pytest.mark.parametrize("sliding, mem_layers", [(False, ()), (False, None), (True, None)])
def test_cached_sampling_equals_uncached(sliding, mem_layers):
    torch.set_default_dtype(torch.float64)
    try:
        model = _mac(
            sliding_window_attn=sliding, neural_memory_layers=mem_layers, neural_memory_batch_size=8, depth=2
        )
        prompt = torch.randint(0, 64, (1, 5))
        greedy = model.sample(prompt, 20, temperature=0.0, use_cache=False, show_progress=False)
        greedy_cached = model.sample(prompt, 20, temperature=0.0, use_cache=True, show_progress=False)
        assert greedy.shape == (1, 15) and torch.equal(greedy, greedy_cached)
        torch.manual_seed(7)
        sampled = model.sample(prompt, 20, temperature=1.0, min_p=0.05, use_cache=False, show_progress=False)
        torch.manual_seed(7)
        sampled_cached = model.sample(
            prompt, 20, temperature=1.0, min_p=0.05, use_cache=True, show_progress=False
        )
        assert torch.equal(sampled, sampled_cached)
    finally:
        torch.set_default_dtype(torch.float32)


def test_cached_logits_match_full_forward():
    model = _mac(neural_memory_batch_size=8).eval()
    x = torch.randint(0, 64, (2, 21))
    full = model(x)
    logits, cache = model(x[:, :13], return_cache=True)
    steps = [logits]
    for t in range(13, 21):
        step, cache = model(x[:, : t + 1], cache=cache, return_cache=True)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="neural_memory_layers"):
        _mac(neural_memory_layers=(5,))
    with pytest.raises(ValueError, match="token ids"):
        _mac()(torch.randn(2, 3, 16))


@pytest.mark.parametrize("variant", ["MemoryAsGateTransformer", "MemoryAsLayerTransformer", "NeuralMemoryLM"])
def test_mag_mal_lmm_are_causal_and_train(variant):
    import titans_pytorch

    model = getattr(titans_pytorch, variant)(
        num_tokens=64,
        dim=16,
        depth=2,
        segment_len=8,
        num_persist_mem_tokens=2,
        dim_head=8,
        heads=2,
        neural_memory_segment_len=4,
        neural_memory_batch_size=8,
    )
    x = torch.randint(0, 64, (2, 20))
    logits = model(x)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 64
    torch.testing.assert_close(model(y)[:, :12], logits[:, :12])  # the future does not leak
    model(x, return_loss=True).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.sample(x[:, :3], 6, temperature=0.0).shape == (2, 3)
