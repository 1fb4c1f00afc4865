"""GLA / Mamba-2 / DeltaNet / Gated DeltaNet extractors on fla's own models (random tiny configs, CUDA).

The oracle is fla itself: the state at position t must equal the recurrent state in fla's cache after
``model(input_ids[:, :t+1], use_cache=True)`` (fused-recurrent kernels for <= 64 tokens, chunked above), and
the short-convolution windows must equal the cached ``conv_state``.

Tolerances: on CPU with fla 0.6.0's Triton kernels under TRITON_INTERPRET=1 in fp32 every family here passed
these tests (DeltaNet with fla's fp32 guard lifted). On CUDA, Triton's fp32 ``tl.dot`` uses TF32 (~5e-4 per
rounding), hence FP32_TOL; fla's ``chunk_delta_rule`` refuses fp32, so DeltaNet runs in bf16 (BF16_TOL, as
for the RetNet GPU test). A semantic slip (transposed state, wrong gate or normalization) is O(1).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

FP32_TOL = 5e-3
BF16_TOL = 5e-2
V = 256
FAMILIES = ["gla", "gla_gqa", "mamba2", "delta_net", "gated_delta_net"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _model(family: str):
    """(fla model on CUDA, extractor class, tolerance)."""
    pytest.importorskip("fla")
    import fla.models as m
    from retnet_forgetting.extractors import (
        DeltaNetStateExtractor,
        GatedDeltaNetStateExtractor,
        GLAStateExtractor,
        Mamba2StateExtractor,
    )

    common = dict(hidden_size=64, num_hidden_layers=2, vocab_size=V)
    specs = {
        "gla": (m.GLAConfig(num_heads=2, use_short_conv=True, **common), m.GLAForCausalLM, GLAStateExtractor),
        "gla_gqa": (m.GLAConfig(num_heads=4, num_kv_heads=2, clamp_min=-2.0, **common), m.GLAForCausalLM,
                    GLAStateExtractor),
        "mamba2": (m.Mamba2Config(num_heads=8, head_dim=16, state_size=16, expand=2, chunk_size=64, **common),
                   m.Mamba2ForCausalLM, Mamba2StateExtractor),
        "delta_net": (m.DeltaNetConfig(num_heads=2, **common), m.DeltaNetForCausalLM, DeltaNetStateExtractor),
        "gated_delta_net": (m.GatedDeltaNetConfig(num_heads=2, head_dim=16, num_v_heads=4,
                                                  allow_neg_eigval=True, **common),
                            m.GatedDeltaNetForCausalLM, GatedDeltaNetStateExtractor),
    }
    cfg, model_cls, ex = specs[family]
    dtype, tol = (torch.bfloat16, BF16_TOL) if family == "delta_net" else (torch.float32, FP32_TOL)
    torch.manual_seed(0)
    return model_cls(cfg).cuda().to(dtype).eval(), ex, tol


@pytest.mark.parametrize("family", FAMILIES)
def test_states_at_positions_equal_fla_cache(family):
    model, ex_cls, tol = _model(family)
    ids = torch.randint(0, V, (2, 150), device="cuda")
    positions = [0, 63, 64, 149]
    ex = ex_cls(model)
    got = ex.extract_states_at_positions(ids, positions)
    ref = ex.extract_states_incremental(ids, positions)
    errors = {(layer, t): _rel(got[layer][:, j], ref[layer][:, j]) for layer in got
              for j, t in enumerate(positions)}
    print(family, "relative errors (layer, t):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(got[layer].shape == ref[layer].shape for layer in got)
    assert max(errors.values()) < tol, errors
    native = ex_cls(model, layout="native").extract_states(ids)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    for layer in native:
        assert _rel(native[layer], cache[layer]["recurrent_state"]) < tol, (family, layer)


@pytest.mark.parametrize("family", ["gla", "mamba2", "gated_delta_net"])
def test_conv_states_and_padding_match_fla(family):
    model, ex_cls, tol = _model(family)
    ex = ex_cls(model)
    ids = torch.randint(0, V, (2, 90), device="cuda")
    conv = ex.extract_conv_states_at_positions(ids, [89])
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    for layer, named in conv.items():
        cached = cache[layer]["conv_state"]
        cached = (cached,) if isinstance(cached, torch.Tensor) else tuple(cached)
        assert len(cached) == len(named) > 0
        for c, (name, ours) in zip(cached, named.items()):
            assert _rel(ours[:, 0], c) < tol, (family, layer, name, _rel(ours[:, 0], c))
    # a padded batch gives each row's own states
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    both = ex.extract_states_at_positions(ids, torch.tensor([[10, 89], [10, 69]]), attention_mask=mask)
    alone = ex.extract_states_at_positions(ids[1:, :70], [10, 69])
    for layer in both:
        assert _rel(both[layer][1], alone[layer][0]) < tol, (family, layer)
