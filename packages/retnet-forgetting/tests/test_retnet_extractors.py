"""GLA / Mamba-2 / DeltaNet / Gated DeltaNet extractors on the CPU reference models (no fla needed).

Oracle: the model's own token-by-token recurrence (reference mixers in ``mode="recurrent"``) run on
``input_ids[:, :t+1]``; its cached final state must equal the extractor's state at t.
"""

from __future__ import annotations

import pytest
import torch
from retnet_forgetting.extractors import (
    DeltaNetStateExtractor,
    GatedDeltaNetStateExtractor,
    GLAStateExtractor,
    Mamba2StateExtractor,
    delta_net_reference_model,
    extractor_for,
    gated_delta_net_reference_model,
    gla_reference_model,
    mamba2_reference_model,
    scan,
)

V = 64
FAMILIES = {
    "gla": (gla_reference_model, dict(use_short_conv=True, gate_logit_normalizer=4, feature_map="relu"),
            GLAStateExtractor),
    "gla_clamped": (gla_reference_model, dict(clamp_min=-0.05), GLAStateExtractor),
    "mamba2": (mamba2_reference_model, dict(n_groups=2), Mamba2StateExtractor),
    "delta_net": (delta_net_reference_model, dict(), DeltaNetStateExtractor),
    "delta_net_plain": (delta_net_reference_model, dict(use_short_conv=False, qk_activation="relu",
                                                        qk_norm="sum", allow_neg_eigval=True),
                        DeltaNetStateExtractor),
    "gated_delta_net": (gated_delta_net_reference_model, dict(num_v_heads=4, allow_neg_eigval=True),
                        GatedDeltaNetStateExtractor),
}


def _model(family: str, mode: str = "recurrent"):
    make, kwargs, cls = FAMILIES[family]
    torch.manual_seed(0)
    return make(vocab_size=V, **kwargs, mode=mode).eval(), cls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_states_at_positions_equal_the_models_own_recurrence(family):
    model, cls = _model(family)
    ids = torch.randint(0, V, (2, 135), generator=torch.Generator().manual_seed(1))
    positions = [0, 5, 63, 64, 127, 134]
    ex = cls(model, position_block=4)  # several blocks of positions
    got = ex.extract_states_at_positions(ids, positions)
    ref = ex.extract_states_incremental(ids, positions)
    assert sorted(got) == [0, 1]
    for layer in got:
        assert got[layer].shape == ref[layer].shape and got[layer].dtype == torch.float32
        torch.testing.assert_close(got[layer], ref[layer], atol=2e-5, rtol=1e-4)
    assert got[1].abs().amax() > 1e-3  # states are not trivially zero
    native = cls(model, layout="native").extract_states(ids)
    cache = model(ids, use_cache=True).past_key_values
    for layer in native:
        torch.testing.assert_close(native[layer], cache[layer]["recurrent_state"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gla", "mamba2", "gated_delta_net"])
def test_run_with_cache_logits_conv_states_and_single_pass(family):
    model, cls = _model(family, mode="chunk")
    ex = cls(model, state_dtype=torch.float64)
    ids = torch.randint(0, V, (1, 70), generator=torch.Generator().manual_seed(2))
    logits, cache = ex.run_with_cache(ids)
    torch.testing.assert_close(logits, model(ids).logits)
    own = model(ids, use_cache=True).past_key_values
    prefix = ex.hook_module
    for layer in range(ex.num_layers):
        state = cache[f"blocks.{layer}.{prefix}.hook_state"]
        assert state.dtype == torch.float64 and state.dim() == 4
        convs = {k: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.{prefix}.hook_conv_state_")}
        assert len(convs) == len(own[layer]["conv_state"]) > 0
        for got, want in zip(convs.values(), own[layer]["conv_state"]):
            torch.testing.assert_close(got.float(), want)
    early = ex.extract_conv_states_at_positions(ids, [1])[0]
    for window in early.values():  # before the sequence start the window holds zeros
        assert window[..., :2].abs().max() == 0 and window[..., 2:].abs().max() > 0
    every = ex.extract_states_single_pass(ids, layers=[1])
    picked = ex.extract_states_at_positions(ids, [0, 33, 69], layers=[1])
    torch.testing.assert_close(every[1][:, [0, 33, 69]], picked[1])
    assert every[1].shape[1] == 70


@pytest.mark.parametrize("family", ["gla", "delta_net"])
def test_padding_gives_each_rows_own_states(family):
    model, cls = _model(family, mode="chunk")
    ex = cls(model)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 90), generator=gen), torch.randint(0, V, (1, 50), generator=gen)
    ids = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.zeros(2, 100, dtype=torch.long)
    ids[0, 10:], mask[0, 10:] = a, 1  # left padded
    ids[1, :50], mask[1, :50] = b, 1  # right padded
    both = ex.extract_states_at_positions(ids, torch.tensor([[10, 99], [0, 49]]), attention_mask=mask)
    finals = ex.extract_states(ids, attention_mask=mask)
    for row, seq in ((0, a), (1, b)):
        alone = ex.extract_states_at_positions(seq, [0, seq.shape[1] - 1])
        for layer in alone:
            torch.testing.assert_close(both[layer][row], alone[layer][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(finals[layer][row], alone[layer][0, 1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="padding"):
        ex.extract_states_at_positions(ids, torch.tensor([[0, 99], [0, 49]]), attention_mask=mask)


def test_forward_stops_after_the_deepest_requested_layer():
    model, cls = _model("mamba2", mode="chunk")
    calls = []
    model.backbone.layers[1].mixer.register_forward_pre_hook(lambda *_: calls.append(1))
    ex = cls(model)
    ex.extract_states_at_positions(torch.randint(0, V, (1, 20)), [3], layers=[0])
    assert calls == []
    ex.extract_states_at_positions(torch.randint(0, V, (1, 20)), [3], layers=[1])
    assert calls == [1]


def test_dispatch_and_errors():
    from retnet_forgetting import RetNetStateExtractor
    from retnet_forgetting.reference import RetNetConfig, RetNetForCausalLM

    for family, (make, kwargs, cls) in FAMILIES.items():
        assert type(extractor_for(make(vocab_size=V, num_layers=1, **kwargs))) is cls, family
    retnet = RetNetForCausalLM(RetNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=V))
    assert isinstance(extractor_for(retnet), RetNetStateExtractor)
    with pytest.raises(TypeError, match="none of RetNet"):
        extractor_for(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GLA model"):
        GLAStateExtractor(mamba2_reference_model())
    ex = GLAStateExtractor(gla_reference_model(vocab_size=V))
    with pytest.raises(ValueError, match="layers"):
        ex.extract_states(torch.randint(0, V, (1, 8)), layers=[5])
    with pytest.raises(ValueError, match="positions"):
        ex.extract_states_at_positions(torch.randint(0, V, (1, 8)), [8])
    with pytest.raises(ValueError, match="layout"):
        GLAStateExtractor(gla_reference_model(vocab_size=V), layout="vk")
    assert ex.hook_names == ["blocks.0.attn.hook_state", "blocks.1.attn.hook_state"]


@pytest.mark.parametrize("per_channel", [True, False])
def test_scans_stay_exact_under_strong_decay(per_channel):
    """Decays down to exp(-30) per token: relative in-chunk decays never overflow, states stay finite."""
    g = torch.Generator().manual_seed(4)
    B, T, H, K, D = 1, 100, 2, 4, 3
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, D))
    log_a = -30 * torch.rand(B, T, H, K if per_channel else 1, generator=g)
    h, final = scan.chunk_entry_states(k, v, log_a, 32)
    o_ref, final_ref = scan.recurrent_scan(q, k, v, log_a, scale=0.5)
    torch.testing.assert_close(final, final_ref)
    torch.testing.assert_close(scan.chunk_output(q, k, v, log_a, h, 0.5, 32), o_ref, atol=1e-5, rtol=1e-4)
    if not per_channel:
        kn = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(B, T, H, generator=g)
        u, h, final = scan.delta_chunk_scan(kn, v, beta, log_a, 32)
        _, final_ref = scan.recurrent_scan(None, kn, v, log_a, beta=beta)
        assert torch.isfinite(u).all()
        torch.testing.assert_close(final, final_ref)
        pos = torch.tensor([[0, 31, 32, 99]])
        want = torch.stack([scan.recurrent_scan(None, kn[:, :t + 1], v[:, :t + 1], log_a[:, :t + 1],
                                                beta=beta[:, :t + 1])[1] for t in pos[0].tolist()], 1)
        torch.testing.assert_close(scan.states_at_positions(kn, u, log_a, pos, h, 32), want)
    with pytest.raises(ValueError, match="log_a"):
        scan.chunk_entry_states(k, v, log_a[..., :2] if per_channel else log_a[:, :5], 32)
