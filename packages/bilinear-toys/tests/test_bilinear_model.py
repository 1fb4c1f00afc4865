from __future__ import annotations

import pytest
import torch
from bilinear_toys import ModelConfig, ToyTransformer
from bilinear_toys.models.rope import Rotary, rope_matrix
from einops import einsum

MODEL_TYPES = ["attention_only_1L", "attention_only_2L", "transformer_1L", "transformer_2L"]


def tiny(model_type: str, **kw) -> ToyTransformer:
    cfg = ModelConfig(model_type, vocab_size=37, d_model=16, n_head=2, n_ctx=32, **kw)
    torch.manual_seed(0)
    model = ToyTransformer(cfg).double()
    for p in model.parameters():  # trained-like weights: the zero-initialized projections too
        torch.nn.init.normal_(p, 0.0, 0.4)
    return model


@pytest.mark.parametrize(("field", "value"), [
    ("model_type", "mlp_only_1L"), ("d_model", 0), ("n_head", 5), ("dropout", 1.5), ("norm", "layer"),
    ("attention_impl", "flash"), ("use_rope", 1), ("d_mlp", -2), ("init_std", 0.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: expected"):
        ModelConfig(**{"model_type": "transformer_1L", "d_model": 16, field: value})


def test_config_properties_and_seed_json():
    cfg = ModelConfig.from_dict({"vocab_size": 4096, "d_model": 512, "n_ctx": 512, "n_head": 8,
                                 "dropout": 0.1, "model_type": "transformer_3L", "num_batches": 100})
    assert (cfg.n_layers, cfg.has_mlp, cfg.d_head, cfg.d_mlp) == (3, True, 64, 2048)
    with pytest.raises(ValueError, match="unknown field 'num_batches'"):
        ModelConfig.from_dict({"num_batches": 1}, strict=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_init_follows_the_seed():
    cfg = ModelConfig("transformer_1L", vocab_size=300, d_model=64, n_head=4, n_ctx=16)
    model = ToyTransformer(cfg)
    assert model.W_U.data_ptr() == model.W_E.data_ptr()  # tied
    assert torch.all(model.blocks[0].attn.o.weight == 0) and torch.all(model.blocks[0].mlp.down.weight == 0)
    assert abs(model.W_E.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.q.weight.std().item() - 0.02) < 0.002


def test_weight_shapes():
    m = tiny("transformer_2L")
    assert m.W_E.shape == (37, 16) and m.W_U.shape == (16, 37)
    assert m.W_Q.shape == m.W_K.shape == m.W_V.shape == (2, 2, 16, 8)
    assert m.W_O.shape == (2, 2, 8, 16)
    assert m.W_L.shape == m.W_R.shape == (2, 16, 64) and m.W_P.shape == (2, 64, 16)
    with pytest.raises(ValueError, match="has no MLP"):
        tiny("attention_only_1L").W_L  # noqa: B018


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_matches_weights_written_out(model_type):
    """The forward pass equals the maths written with the TransformerLens-shaped weights."""
    m = tiny(model_type)
    tokens = torch.randint(0, 37, (3, 11))
    rot = Rotary(8, 32)
    x = m.W_E[tokens]
    t = tokens.shape[1]
    mask = torch.tril(torch.ones(t, t, dtype=torch.float64))
    for layer in range(m.config.n_layers):
        q = rot(einsum(x, m.W_Q[layer], "b t d, h d e -> b t h e"))
        k = rot(einsum(x, m.W_K[layer], "b t d, h d e -> b t h e"))
        v = einsum(x, m.W_V[layer], "b t d, h d e -> b t h e")
        pattern = (einsum(q, k, "b i h e, b j h e -> b h i j") / 8).square() * mask
        z = einsum(pattern, v, "b h i j, b j h e -> b i h e")
        x = x + einsum(z, m.W_O[layer], "b i h e, h e d -> b i d")
        if m.config.has_mlp:
            x = x + ((x @ m.W_L[layer]) * (x @ m.W_R[layer])) @ m.W_P[layer]
    torch.testing.assert_close(m(tokens), x @ m.W_U, rtol=1e-10, atol=1e-10)


def test_run_with_cache_names_and_values():
    m = tiny("transformer_2L")
    tokens = torch.randint(0, 37, (2, 9))
    logits, cache = m.run_with_cache(tokens)
    torch.testing.assert_close(logits, m(tokens))
    for name in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_scores",
                 "blocks.0.attn.hook_pattern",
                 "blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_pre",
                 "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_result"]:
        assert name in cache, name
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 2, 9, 9)
    assert torch.all(cache["blocks.0.attn.hook_pattern"].triu(1) == 0)
    scores = cache["blocks.0.attn.hook_scores"]
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], scores.square().tril())
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"] @ m.W_U, logits)
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"].sum(2), cache["blocks.1.hook_attn_out"])
    _, only = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert set(only) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}


def test_hooks_can_ablate():
    m = tiny("attention_only_1L")
    tokens = torch.randint(0, 37, (1, 6))
    with m.hooks([("blocks.0.hook_attn_out", lambda x, hook: torch.zeros_like(x))]):
        ablated = m(tokens)
    torch.testing.assert_close(ablated, m.W_E[tokens] @ m.W_U)
    with pytest.raises(KeyError, match="no such hook point"), m.hooks([("blocks.9.hook_z", lambda x, h: x)]):
        pass


@pytest.mark.parametrize("impl", ["linear", "auto"])
def test_attention_impls_agree(impl):
    m = tiny("transformer_1L")
    tokens = torch.randint(0, 37, (2, 21))
    ref = m(tokens)
    m.config.attention_impl, m.config.linear_crossover = impl, 8
    torch.testing.assert_close(m(tokens), ref, rtol=1e-9, atol=1e-9)


def test_rope_relative_offset_property():
    rot = Rotary(8, 16)
    q, k = torch.randn(1, 16, 1, 8, dtype=torch.float64), torch.randn(1, 16, 1, 8, dtype=torch.float64)
    q[:, :] = q[:, :1]
    k[:, :] = k[:, :1]
    qr, kr = rot(q)[0, :, 0], rot(k)[0, :, 0]
    dots = qr @ kr.T
    for i, j in [(5, 3), (9, 7), (12, 10)]:  # same offset -> same score
        torch.testing.assert_close(dots[i, j], dots[5, 3])
    r = rope_matrix(torch.tensor(4), 8, 10000.0)
    torch.testing.assert_close(rot(q)[0, 4, 0], r @ q[0, 4, 0])


def test_norm_variants_run_and_train_step():
    m = ToyTransformer(ModelConfig("transformer_1L", vocab_size=20, d_model=8, n_head=2, n_ctx=8, norm="rms",
                                   qk_norm=True, dropout=0.1, tie_weights=False))
    tokens = torch.randint(0, 20, (2, 8))
    loss = torch.nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert m.embed.weight.grad is not None and torch.isfinite(loss)
    with pytest.raises(ValueError, match="tokens: expected an integer tensor"):
        m(torch.zeros(2, 3))


@pytest.mark.gpu
def test_cuda_linear_form_trains_under_bf16():
    cfg = ModelConfig("transformer_2L", vocab_size=512, d_model=128, n_head=4, n_ctx=256, init="unit",
                      attention_impl="linear")
    torch.manual_seed(0)
    model = ToyTransformer(cfg).cuda()
    tokens = torch.randint(0, 512, (4, 256), device="cuda")
    with torch.no_grad():
        lin = model(tokens)
        model.config.attention_impl = "quadratic"
        quad = model(tokens)
    torch.testing.assert_close(lin, quad, rtol=1e-3, atol=1e-3)
    model.config.attention_impl = "linear"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1),
                                                 tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
