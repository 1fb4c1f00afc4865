from __future__ import annotations

import pytest
import torch
from bilinear_toys import ModelConfig, ToyTransformer
from bilinear_toys import circuits as C

MODEL_TYPES = ["attention_only_1L", "attention_only_2L", "transformer_1L", "transformer_2L",
               "attention_only_3L"]


def tiny(model_type: str, std: float = 0.3, seed: int = 0, **kw) -> ToyTransformer:
    cfg = ModelConfig(model_type, vocab_size=23, d_model=12, n_head=2, n_ctx=16, **kw)
    torch.manual_seed(seed)
    model = ToyTransformer(cfg).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, std)
    return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_from_network_is_exact(model_type):
    m = tiny(model_type)
    tokens = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(1))
    net = C.logits_from_network(m, tokens)
    ref = m(tokens).detach()
    assert ref.abs().max() > 1.0  # not a trivially small comparison
    torch.testing.assert_close(net, ref, rtol=1e-8, atol=1e-8)


def test_logits_from_network_without_rope():
    m = tiny("transformer_1L", use_rope=False)
    tokens = torch.randint(0, 23, (1, 6))
    torch.testing.assert_close(C.logits_from_network(m, tokens), m(tokens).detach(), rtol=1e-8, atol=1e-8)


def test_non_polynomial_models_are_refused():
    m = ToyTransformer(ModelConfig("transformer_1L", vocab_size=10, d_model=8, n_head=2, n_ctx=8, norm="rms"))
    with pytest.raises(ValueError, match="logits_from_network: needs a polynomial model"):
        C.logits_from_network(m, torch.zeros(1, 3, dtype=torch.long))


def test_qk_circuit_per_offset_matches_the_scores():
    m = tiny("attention_only_1L")
    tokens = torch.randint(0, 23, (1, 9), generator=torch.Generator().manual_seed(2))
    _, cache = m.run_with_cache(tokens)
    scores = cache["blocks.0.attn.hook_scores"][0]
    for h in range(2):
        for i, j in [(5, 5), (5, 4), (8, 2), (3, 0)]:
            qk = C.qk_circuit(m, 0, h, offset=i - j)
            torch.testing.assert_close(qk[tokens[0, i], tokens[0, j]], scores[h, i, j])
    torch.testing.assert_close(C.qk_circuit(m, 0, 1, offset=None), C.qk_circuit(m, 0, 1, offset=0))
    assert not torch.allclose(C.qk_circuit(m, 0, 1, offset=3), C.qk_circuit(m, 0, 1, offset=None))
    # sign-invariance: flipping W_K flips every score but leaves the pattern
    flipped = tiny("attention_only_1L")
    flipped.blocks[0].attn.k.weight.data.neg_()
    torch.testing.assert_close(C.qk_pattern(flipped, 0, 0, 2), C.qk_pattern(m, 0, 0, 2))


def test_full_circuit_slices_explain_a_two_token_context():
    m = tiny("attention_only_1L")
    ov = torch.stack([C.ov_circuit(m, 0, h) for h in range(2)])
    full = torch.cat([t for _, t in C.full_circuit_slices(m, offsets=1, dst_chunk=5)])  # [V, V, V]
    assert full.shape == (23, 23, 23)
    for src, dst in [(3, 7), (11, 11), (0, 22)]:
        logits = m(torch.tensor([[src, dst]]))[0, 1].detach()
        self_term = sum(C.qk_pattern(m, 0, h, 0)[dst, dst] * ov[h, dst] for h in range(2))
        torch.testing.assert_close(logits - C.direct_path(m)[dst] - self_term, full[dst, src])
    top = C.top_skip_trigrams(m, k=5, offsets=1, center=True, dst_chunk=4)
    centered = full - full.mean(dim=1, keepdim=True)
    flat = centered.permute(1, 0, 2)  # [src, dst, out]
    want = flat.flatten().topk(5).values
    got = torch.tensor([s for *_, s in top], dtype=want.dtype)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    a, b, c, s = top[0]
    assert abs(flat[a, b, c].item() - s) < 1e-5


def test_full_circuit_with_mlp_explains_a_two_token_context():
    """transformer_1L: attention + bilinear MLP paths give the exact logit change from one context token."""
    m = tiny("transformer_1L", std=0.2)
    full = torch.cat([t for _, t in C.full_circuit_slices(m, offsets=1, dst_chunk=7, include_mlp=True)])
    attn_only = torch.cat([t for _, t in C.full_circuit_slices(m, offsets=1, dst_chunk=7)])
    assert (full - attn_only).abs().max() > 0.1 * attn_only.abs().max()  # the MLP path matters here
    for src, dst in [(3, 7), (11, 11), (0, 22)]:
        with torch.no_grad():
            change = m(torch.tensor([[src, dst]]))[0, 1] - m(torch.tensor([[dst]]))[0, 0]
        torch.testing.assert_close(change, full[dst, src], rtol=1e-9, atol=1e-9)


def test_copying_scores_of_constructed_heads():
    m = tiny("attention_only_1L")
    attn = m.blocks[0].attn
    w_v = attn.v.weight.data  # [(h e), d]
    attn.o.weight.data.copy_(w_v.T)  # OV_h = W_V W_V^T; with tied W_U the full OV is PSD: pure copying
    assert C.copying_score(m, 0, 0) == pytest.approx(1.0, abs=1e-9)
    assert C.ov_diagonal_score(m, 0, 0) > 0.2  # chance: 1/23
    attn.o.weight.data.copy_(-w_v.T)
    assert C.copying_score(m, 0, 1) == pytest.approx(-1.0, abs=1e-9)
    assert C.ov_eigenvalues(m, 0, 0).shape == (6,)
    attn.o.weight.data[0, 0] = float("nan")  # a diverged model: a clear error, not a LAPACK abort
    with pytest.raises(ValueError, match="layer 0 head 0: the OV circuit has non-finite entries"):
        C.ov_eigenvalues(m, 0, 0)


def test_positional_profile_matches_brute_force():
    m = tiny("attention_only_2L")
    prof = C.positional_profile(m, 1, 0, max_offset=4)
    brute = torch.stack([C.qk_circuit(m, 1, 0, o).square().mean() for o in range(5)])
    torch.testing.assert_close(prof.double(), brute, rtol=1e-5, atol=0)
    assert 0.0 <= C.previous_token_score_weights(m, 1, 0, 4) <= 1.0


def test_composition_scores():
    m = tiny("attention_only_2L")
    for kind in "qkv":
        s = C.composition_scores(m, kind)
        assert s.shape == (2, 2, 2, 2)
        assert torch.all(s[1] == 0) and torch.all(s[:, :, 0] == 0)
        assert torch.all((s[0, :, 1] > 0) & (s[0, :, 1] <= 1))
    ov, qk = m.OV.detach(), m.QK.detach()
    want = (ov[0, 1] @ qk[1, 0].T).norm() / (ov[0, 1].norm() * qk[1, 0].norm())
    torch.testing.assert_close(C.composition_scores(m, "k")[0, 1, 1, 0], want)
    with pytest.raises(ValueError, match="kind='x'"):
        C.composition_scores(m, "x")


def test_bilinear_interaction_matrices_reproduce_the_mlp():
    m = tiny("transformer_1L")
    x = torch.randn(5, 12, dtype=torch.float64)
    mlp_out = m.blocks[0].mlp(x).detach()
    u = torch.randn(3, 12, dtype=torch.float64)
    b = C.interaction_matrices(m, 0, u).detach()
    torch.testing.assert_close(torch.einsum("na,kab,nb->nk", x, b, x), mlp_out @ u.T)
    torch.testing.assert_close(b, b.transpose(-1, -2))
    bt = C.token_interaction_matrices(m, 0, [4, 9]).detach()
    torch.testing.assert_close(torch.einsum("na,kab,nb->nk", x, bt, x), mlp_out @ m.W_U[:, [4, 9]].detach())
    vals, vecs = C.interaction_eigen(bt)
    assert torch.all(vals.abs()[:, :-1] >= vals.abs()[:, 1:])
    torch.testing.assert_close(vecs @ torch.diag_embed(vals) @ vecs.transpose(-1, -2), bt)
    ks, err = C.truncation_curve(bt, x, ks=[0, 3, 12])
    assert ks == [0, 3, 12] and err.shape == (3, 2)
    torch.testing.assert_close(err[0], torch.ones(2))
    assert torch.all(err[-1] < 1e-10)


def test_effective_rank():
    assert C.effective_rank(torch.tensor([3.0, 0, 0, 0])).item() == pytest.approx(1.0)
    assert C.effective_rank(torch.tensor([1.0, -1, 1, -1])).item() == pytest.approx(4.0)
    assert C.rank_for_fraction(torch.tensor([3.0, 0.5, 0.1]), 0.9).item() == 1
    assert C.rank_for_fraction(torch.tensor([3.0, 2, 0.1]), 0.9).item() == 2
