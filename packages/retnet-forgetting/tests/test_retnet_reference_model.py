from __future__ import annotations

import pytest
import torch
from retnet_forgetting.reference import RETNET_2_7B, RetNetConfig, RetNetForCausalLM

TINY = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, hidden_ratio=2)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return RetNetForCausalLM(RetNetConfig(**{**TINY, **kw})).eval()


def fla_keys(cfg: RetNetConfig) -> set[str]:
    keys = {"model.embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {p + "attn_norm.weight", p + "mlp_norm.weight", p + "attn.g_norm_swish_gate.weight"}
        keys |= {p + f"attn.{n}_proj.weight" for n in "qkvgo"}
        keys |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    return keys


def test_state_dict_keys_and_shapes_match_fla():
    m = _model()
    sd = m.state_dict()
    assert set(sd) == fla_keys(m.config)
    assert sd["model.layers.0.attn.k_proj.weight"].shape == (32, 32)  # expand_k 1
    assert sd["model.layers.0.attn.v_proj.weight"].shape == (64, 32)  # expand_v 2
    assert sd["model.layers.0.attn.g_norm_swish_gate.weight"].shape == (32,)  # head_v_dim
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (256, 32)  # 2/3*32*2 -> 256 multiple


def test_unfused_norm_renames_gate_norm_so_fused_checkpoints_fail_loudly():
    fused = _model().state_dict()
    unfused = _model(fuse_norm=False)
    assert "model.layers.0.attn.g_norm.weight" in unfused.state_dict()
    with pytest.raises(RuntimeError, match="g_norm"):
        unfused.load_state_dict(fused)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"num_kv_heads": 1},
                                {"intermediate_size": 40}, {"use_output_gate": False, "fuse_norm": False}])
def test_analytic_parameter_count_matches_built_model(kw):
    m = _model(**kw)
    assert sum(p.numel() for p in m.parameters()) == m.config.num_parameters()


def test_2_7b_config_has_2_72b_parameters():
    cfg = RetNetConfig(**RETNET_2_7B)
    assert (cfg.head_k_dim, cfg.head_v_dim, cfg.num_heads) == (256, 512, 10)
    assert cfg.mlp_intermediate_size == 3584
    assert round(cfg.num_parameters() / 1e9, 2) == 2.72


def test_modes_and_state_continuation_agree():
    m = _model()
    ids = torch.randint(0, 64, (2, 40))
    ref = m(ids, use_cache=True)
    for mode in ("recurrent", "parallel"):
        for layer in m.model.layers:
            layer.attn.mode = mode
        torch.testing.assert_close(m(ids).logits, ref.logits, atol=1e-4, rtol=1e-4)
    for layer in m.model.layers:
        layer.attn.mode = "chunk"
    first = m(ids[:, :25], use_cache=True)
    second = m(ids[:, 25:], states=first.states, use_cache=True, seqlen_offset=25)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), ref.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(second.states, ref.states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ref.states[0].shape == (2, 2, 16, 32)


def test_padding_on_either_side_equals_unpadded_runs():
    m = _model()
    a, b = torch.randint(0, 64, (1, 20)), torch.randint(0, 64, (1, 13))
    pad = torch.zeros(1, 7, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])  # row 1 left-padded
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1)]).long()
    out = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], m(a).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:], m(b).logits[0], atol=1e-5, rtol=1e-5)
    right_mask = torch.cat([torch.ones(1, 13), torch.zeros(1, 7)], 1)
    right = m(torch.cat([b, pad], 1), attention_mask=right_mask).logits
    torch.testing.assert_close(right[0, :13], m(b).logits[0], atol=1e-5, rtol=1e-5)


def test_loss_is_next_token_cross_entropy():
    m = _model()
    ids = torch.randint(0, 64, (2, 9))
    out = m(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)


def test_save_and_load_roundtrip_and_legacy_fused_mlp(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "ckpt")
    loaded = RetNetForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits)
    legacy = dict(m.state_dict())
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        up = legacy.pop(p + "up_proj.weight")
        legacy[p + "gate_proj.weight"] = torch.cat([legacy[p + "gate_proj.weight"], up])
    fresh = _model(seed=1)
    fresh.load_state_dict(legacy)
    torch.testing.assert_close(fresh(ids).logits, m(ids).logits)


def test_config_validation_and_unknown_keys():
    with pytest.raises(ValueError, match="use_short_conv"):
        RetNetConfig(**TINY, use_short_conv=True)
    with pytest.raises(ValueError, match="expand_k"):
        RetNetConfig(hidden_size=30, num_heads=4)
    cfg = RetNetConfig.from_dict({**TINY, "rms_norm_eps": 1e-6, "share_conv_kernel": True,
                                  "model_type": "retnet"})
    assert cfg.extra == {"rms_norm_eps": 1e-6, "share_conv_kernel": True}
    assert cfg.to_dict()["share_conv_kernel"] is True
