from __future__ import annotations

import pytest
import torch
from retnet_forgetting.extraction import RetNetStateExtractor
from retnet_forgetting.reference import RetNetConfig, RetNetForCausalLM

TINY = dict(hidden_size=32, num_hidden_layers=3, num_heads=2, vocab_size=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_states_at_positions_equal_prefix_reruns(model, ids, chunk_size):
    ex = RetNetStateExtractor(model, chunk_size=chunk_size)
    positions = [0, 7, 8, 20, 44]
    got = ex.extract_states_at_positions(ids, positions)
    oracle = ex.extract_states_incremental(ids, positions)
    assert set(got) == {0, 1, 2}
    for layer in got:
        assert got[layer].shape == (2, 5, 2, 16, 32)
        torch.testing.assert_close(got[layer], oracle[layer], atol=1e-4, rtol=1e-4)


def test_final_states_equal_model_cache_and_per_row_positions(model, ids):
    ex = RetNetStateExtractor(model, chunk_size=16)
    final = ex.extract_states(ids)
    cache = model(ids, use_cache=True).states
    for layer in range(3):
        torch.testing.assert_close(final[layer], cache[layer], atol=1e-4, rtol=1e-4)
    per_row = torch.tensor([[3, 30], [44, 10]])
    got = ex.extract_states_at_positions(ids, per_row, layers=[1])
    assert list(got) == [1]
    for b in range(2):
        for j in range(2):
            t = int(per_row[b, j])
            ref = model(ids[b:b + 1, : t + 1], use_cache=True).states[1][0]
            torch.testing.assert_close(got[1][b, j], ref, atol=1e-4, rtol=1e-4)


def test_padding_left_and_right_gives_each_rows_own_states(model):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 64, (1, 30), generator=g), torch.randint(0, 64, (1, 19), generator=g)
    ex = RetNetStateExtractor(model, chunk_size=8)
    for left in (True, False):
        pad = torch.zeros(1, 11, dtype=torch.long)
        row_b = torch.cat([pad, b] if left else [b, pad], 1)
        zeros, ones = torch.zeros(1, 11), torch.ones(1, 19)
        mask_b = torch.cat([zeros, ones] if left else [ones, zeros], 1)
        ids = torch.cat([a, row_b])
        mask = torch.cat([torch.ones(1, 30), mask_b]).long()
        final = ex.extract_states(ids, attention_mask=mask)
        col = 11 + 4 if left else 4  # token 4 of b
        at = ex.extract_states_at_positions(ids, torch.tensor([[4], [col]]), attention_mask=mask)
        sa, sb, sb5 = (model(x, use_cache=True).states for x in (a, b, b[:, :5]))
        for layer in range(3):
            torch.testing.assert_close(final[layer][0], sa[layer][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(final[layer][1], sb[layer][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(at[layer][1, 0], sb5[layer][0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="padding"):
        ex.extract_states_at_positions(ids, torch.tensor([[0], [25]]), attention_mask=mask)


def test_single_pass_streams_every_position(model, ids):
    ex = RetNetStateExtractor(model, chunk_size=8, position_block=16)
    full = ex.extract_states_single_pass(ids, layers=[0, 2])
    assert full[2].shape == (2, 45, 2, 16, 32)
    some = [0, 5, 7, 8, 23, 44]
    oracle = ex.extract_states_incremental(ids, some, layers=[2])
    torch.testing.assert_close(full[2][:, some], oracle[2], atol=1e-4, rtol=1e-4)
    seen = []
    ex.extract_states_single_pass(ids, layers=[1], reduce=lambda s: s.norm(dim=(-2, -1)),
                                  sink=lambda layer, pos, s: seen.append((layer, pos, s)))
    assert [p.shape[1] for _, p, _ in seen] == [16, 16, 13]
    norms = torch.cat([s for _, _, s in seen], 1)
    assert norms.shape == (2, 45, 2)
    expected = ex.extract_states_at_positions(ids, list(range(45)), layers=[1])[1].norm(dim=(-2, -1))
    torch.testing.assert_close(norms, expected)
    assert all(layer == 1 for layer, _, _ in seen)


def test_run_with_cache_hook_names_and_logits(model, ids):
    ex = RetNetStateExtractor(model)
    logits, cache = ex.run_with_cache(ids)
    assert list(cache) == ex.hook_names == [f"blocks.{i}.attn.hook_state" for i in range(3)]
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache["blocks.2.attn.hook_state"], model(ids, use_cache=True).states[2],
                               atol=1e-4, rtol=1e-4)


def test_bf16_model_states_stay_close_to_fp32(ids):
    torch.manual_seed(0)
    m32 = RetNetForCausalLM(RetNetConfig(**TINY)).eval()
    m16 = RetNetForCausalLM(RetNetConfig(**TINY)).eval().to(torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    s32 = RetNetStateExtractor(m32).extract_states(ids)[0]
    s16 = RetNetStateExtractor(m16).extract_states(ids)[0]
    assert s16.dtype == torch.float32
    assert (s16 - s32).norm() / s32.norm() < 2e-2


def test_bad_arguments(model, ids):
    ex = RetNetStateExtractor(model)
    with pytest.raises(ValueError, match="positions"):
        ex.extract_states_at_positions(ids, [45])
    with pytest.raises(ValueError, match="layers"):
        ex.extract_states(ids, layers=[3])
    with pytest.raises(TypeError, match="RetNet"):
        RetNetStateExtractor(torch.nn.Linear(2, 2))


def test_extractor_with_triton_correction(model, ids):
    from seqmem_shared.backends import triton_status

    if not triton_status()[0]:
        pytest.skip(triton_status()[1])
    positions = [0, 15, 16, 44]
    ref = RetNetStateExtractor(model, chunk_size=16, backend="torch")
    fast = RetNetStateExtractor(model, chunk_size=16, backend="triton")
    want = ref.extract_states_at_positions(ids, positions)
    got = fast.extract_states_at_positions(ids, positions)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], atol=1e-4, rtol=1e-4)


def test_single_pass_streams_to_per_layer_stores_and_resumes(model, ids, tmp_path):
    from retnet_forgetting.store import stream_states_to_store

    ex = RetNetStateExtractor(model, chunk_size=8, position_block=16)
    stores = stream_states_to_store(ex, ids[0], tmp_path, layers=[0, 2], dtype=torch.float32)
    full = ex.extract_states_single_pass(ids[:1], layers=[2])[2][0]
    torch.testing.assert_close(stores[2].load("state")[2], full)
    assert len(stores[0].manifest["shards"]) == 3 and not stores[0].pending()
    calls = []
    ex.extract_states_single_pass = lambda *a, **k: calls.append(k)  # resume: nothing left to extract
    stream_states_to_store(ex, ids[0], tmp_path, layers=[0, 2], dtype=torch.float32)
    assert calls == []
