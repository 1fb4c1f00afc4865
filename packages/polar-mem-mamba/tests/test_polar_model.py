"""Model: every architecture builds and trains a step; decoder causality; bidirectional encoder; the
memory pool is a causal top-k priority queue; the Mamba-2 mixer is causal; bad inputs are named."""

from __future__ import annotations

import heapq

import pytest
import torch
from polar_mem_mamba import ARCHITECTURES, Config, HybridMambaEncoderDecoder
from polar_mem_mamba.modules import Mamba2, MemoryPool, MemoryPoolState

TINY = dict(d_model=32, d_state=8, headdim=16, n_heads=2, encoder_layers=2, decoder_layers=3,
            cross_attn_layers=(0, 2), mem_pool_size=4, mem_summary_dim=16, mem_update_freq=2,
            num_pairs=6, num_queries=4, chunk_size=8)


def _model(arch: str, seed: int = 0) -> HybridMambaEncoderDecoder:
    torch.manual_seed(seed)
    return HybridMambaEncoderDecoder(Config(architecture=arch, **TINY)).eval()


def _ids(seed: int = 0, batch: int = 2, enc: int = 14, dec: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(10, 8192, (batch, enc), generator=gen),
            torch.randint(10, 4096, (batch, dec), generator=gen))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_builds_and_steps(arch):
    model = _model(arch).train()
    enc, dec = _ids()
    logits = model(enc, dec)
    assert logits.shape == (2, 5, 8192) and torch.isfinite(logits).all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), dec.flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_decoder_is_causal(arch):
    model = _model(arch)
    enc, dec = _ids(dec=7)
    changed = dec.clone()
    changed[:, 4:] = torch.randint(10, 4096, (2, 3))
    with torch.no_grad():
        a, b = model(enc, dec), model(enc, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-5)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_encoder_is_bidirectional(arch):
    model = _model(arch)
    enc, _ = _ids()
    changed = enc.clone()
    changed[:, -1] = (enc[:, -1] + 1) % 8192
    with torch.no_grad():
        a, b = model.encode(enc), model.encode(changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-5, "encoder position 0 must see the last token"


def test_mamba2_mixer_is_causal_and_keeps_shape():
    torch.manual_seed(0)
    mixer = Mamba2(32, d_state=8, headdim=16, chunk_size=4)
    u = torch.randn(2, 11, 32)
    v = u.clone()
    v[:, 6:] += 1.0
    a, b = mixer(u), mixer(v)
    assert a.shape == u.shape
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def _heap_pools(positions: list[int], priorities: list[float], length: int, capacity: int) -> list[set[int]]:
    """Entries a min-heap priority queue of ``capacity`` holds after each position (fed in write order)."""
    heap: list[tuple[float, int]] = []
    pools = []
    for t in range(length):
        for n, (pos, prio) in enumerate(zip(positions, priorities)):
            if pos == t:
                if len(heap) < capacity:
                    heapq.heappush(heap, (prio, n))
                elif prio > heap[0][0]:
                    heapq.heapreplace(heap, (prio, n))
        pools.append({n for _, n in heap})
    return pools


def test_memory_pool_is_a_causal_topk_priority_queue():
    gen = torch.Generator().manual_seed(3)
    batch, length, capacity = 3, 9, 4
    state = MemoryPoolState.empty(batch, 5)
    for _ in range(2):  # two writing layers
        summaries = torch.randn(batch, length, 5, generator=gen)
        state = state.append(summaries, torch.randn(batch, length, generator=gen))
    visible = state.visible(length, capacity)
    assert visible.shape == (batch, length, 2 * length)
    for b in range(batch):
        pools = _heap_pools(state.positions.tolist(), state.priorities[b].tolist(), length, capacity)
        for t in range(length):
            assert set(torch.nonzero(visible[b, t]).flatten().tolist()) == pools[t]
    counts = state.counts(length, capacity)
    assert counts[:, 0].eq(2).all() and counts[:, 1:].eq(capacity).all()


def test_memory_pool_retrieval_reads_only_visible_entries_and_trains_the_scores():
    torch.manual_seed(0)
    pool = MemoryPool(8, pool_size=2, summary_dim=4)
    y = torch.randn(1, 6, 8)
    state = pool.write(y, MemoryPoolState.empty(1, 4))
    out = pool.retrieve(y, state)
    # changing an entry that is not in the pool at t=2 (written later) leaves position 2 unchanged
    later = MemoryPoolState(state.pool.clone(), state.priorities, state.positions)
    later.pool[:, 5] += 10.0
    torch.testing.assert_close(pool.retrieve(y, later)[:, :5], out[:, :5])
    assert torch.equal(pool(y, state), y), "a fresh pool (out_proj = 0) must start as the identity"
    torch.nn.init.normal_(pool.out_proj.weight)
    pool(y, state).sum().backward()
    assert pool.score_proj.weight.grad is not None and pool.score_proj.weight.grad.abs().sum() > 0
    assert pool.out_gate.weight.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    model = _model("mamba2")
    enc, dec = _ids()
    with pytest.raises(ValueError, match="decoder_ids: expected an integer tensor"):
        model(enc, dec.float())
    with pytest.raises(ValueError, match="decoder_ids: expected batch size 2"):
        model(enc, dec[:1])
    with pytest.raises(TypeError, match="config: expected a polar_mem_mamba.Config"):
        HybridMambaEncoderDecoder({"d_model": 32})
