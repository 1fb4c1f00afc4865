"""Weight-based rule recovery on models whose weights implement known rules by construction."""

from __future__ import annotations

import math

import torch
from bilinear_toys import ModelConfig, ToyTransformer
from bilinear_toys import circuits as C
from bilinear_toys.data import SyntheticLanguage
from bilinear_toys.recovery import (
    DEFAULT_THRESHOLDS,
    bigram_recovery,
    calibrate_thresholds,
    context_circuit_slices,
    extended_direct_path,
    filler_circuit_slices,
    filler_contexts,
    robust_z,
    rule_losses,
    skip_trigram_recovery,
)

V = 12


def _one_hot_model() -> ToyTransformer:
    """d_model = V, one-hot embeddings, identity unembedding, one head without RoPE, attention off."""
    cfg = ModelConfig("attention_only_1L", vocab_size=V, d_model=V, n_head=1, n_ctx=8, use_rope=False,
                      tie_weights=False)
    model = ToyTransformer(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.copy_(torch.eye(V))
        model.unembed.weight.copy_(torch.eye(V))
    return model


def test_bigrams_written_into_the_weights_are_recovered():
    model = _one_hot_model()
    planted = [(1, 5), (2, 7), (3, 3)]
    with torch.no_grad():
        for a, b in planted:
            model.unembed.weight[b, a] += 10.0  # W_U[a, b]
    assert extended_direct_path(model).argmax(-1)[1] == 5
    rec = bigram_recovery(model, planted)
    assert rec["precision"] == 1.0 and rec["recall"] == 1.0 and rec["recall_at_k"] == 1.0


def test_robust_z_is_not_compressed_by_one_extreme_score():
    """A single score 10^8 times the others (t2's (BOS, BOS) row) must not set the MAD floor."""
    scores = torch.cat([torch.linspace(-1.0, 1.0, 101), torch.tensor([20.0, 1e8])])
    z = robust_z(scores)
    assert z[-2] > 6 * 4 and z[:101].abs().max() < 2  # 20 is ~40 MADs out; before: z 1e-4


def test_bigrams_survive_a_degenerate_bos_row():
    """The BOS row (context (BOS, BOS), outside the data) extrapolated to huge logits used to set the MAD
    floor of the z-scores and fill recall@k: it is not scored now."""
    model = _one_hot_model()
    planted = [(1, 5), (2, 7), (3, 3)]
    with torch.no_grad():
        for a, b in planted:
            model.unembed.weight[b, a] += 10.0
        model.unembed.weight[4, 0] = 1e8  # (BOS, BOS) -> token 4 at logit 10^8
    rec = bigram_recovery(model, planted)
    assert all(a != 0 for a, _ in rec["candidates"])
    assert rec["precision"] == 1.0 and rec["recall"] == 1.0 and rec["recall_at_k"] == 1.0


def test_filler_contexts_are_seeded_uniform_tokens_without_bos():
    a, b = filler_contexts(40, 64, 16, seed=3), filler_contexts(40, 64, 16, seed=3)
    assert a.shape == (64, 16) and torch.equal(a, b) and not torch.equal(a, filler_contexts(40, 64, 16))
    assert int(a.min()) >= 1 and int(a.max()) == 39 and len(a.unique()) == 39


def test_bigrams_through_self_attention_are_recovered():
    """Tied embeddings make W_E W_U symmetric; a head attending to the current token carries the bigram."""
    model = _one_hot_model()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q.weight.copy_(torch.eye(V) * V**0.5)
        attn.k.weight.copy_(torch.eye(V) * V**0.5)  # s(x, x) = 1: each token attends to itself
        attn.v.weight.copy_(torch.eye(V))
        attn.o.weight[9, 4] = 8.0  # token 4 -> logit of 9
    rec = bigram_recovery(model, [(4, 9)])
    assert rec["recall"] == 1.0 and rec["precision"] == 1.0


def test_skip_trigrams_written_into_the_weights_are_recovered():
    model = _one_hot_model()
    planted = [(1, 2, 6), (3, 4, 8), (5, 10, 11)]  # (A, B, C): A earlier, B now -> C
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q.weight.copy_(torch.eye(V))
        qk = torch.zeros(V, V)
        ov = torch.zeros(V, V)
        for a, b, c in planted:
            qk[b, a] = 3.0 * V  # score s(B, A) = 3
            ov[a, c] = 1.0
        attn.k.weight.copy_(qk)  # k = W_K x: rows indexed by the query's coordinates
        attn.v.weight.copy_(torch.eye(V))
        attn.o.weight.copy_(ov.T)
    for circuit in ("filler", "minimal", "paths"):
        rec = skip_trigram_recovery(model, planted, max_offset=4, circuit=circuit)
        assert rec["recall"] == 1.0 and rec["precision"] == 1.0 and rec["recall_at_k"] == 1.0, circuit
        assert skip_trigram_recovery(model, [(1, 2, 7)], max_offset=4, circuit=circuit)["recall"] == 0.0


def test_skip_trigrams_survive_a_degenerate_bos_source():
    """BOS written at the key position (outside the data: a sequence holds BOS only at its start) with
    huge logits must not enter the centering over sources, which it used to swamp."""
    model = _one_hot_model()
    planted = [(1, 2, 6), (3, 4, 8), (5, 10, 11)]
    attn = model.blocks[0].attn
    qk, ov = torch.zeros(V, V), torch.zeros(V, V)
    for a, b, c in planted:
        qk[b, a], ov[a, c] = 3.0 * V, 1.0
    qk[:, 0] = torch.linspace(1.0, 3.0, V) * V  # every token attends to BOS, each by its own weight ...
    ov[0] = 1e6 * torch.randn(V, generator=torch.Generator().manual_seed(0))  # ... which writes huge logits
    with torch.no_grad():
        attn.q.weight.copy_(torch.eye(V))
        attn.k.weight.copy_(qk)
        attn.v.weight.copy_(torch.eye(V))
        attn.o.weight.copy_(ov.T)
    for circuit in ("filler", "minimal"):
        rec = skip_trigram_recovery(model, planted, max_offset=4, circuit=circuit)
        assert rec["recall"] == 1.0 and rec["precision"] == 1.0 and rec["recall_at_k"] == 1.0, circuit


def test_calibrated_thresholds_separate_or_maximize_f1():
    rec = {"bigrams": {"z_planted": [20.0, 30.0], "z_max_other": 4.0, "z_other_top": [4.0, 2.0]},
           "skip_trigrams": {"z_planted": [8.0, 12.0, 15.0], "z_max_other": 10.0,
                             "z_other_top": [10.0, 3.0, 1.0]},
           "heads": {"previous_token": {"z_planted": [], "z_max_other": 0.1, "z_other_top": [0.1]},
                     "induction": {"z_planted": [0.3], "z_max_other": float("-inf"), "z_other_top": []}}}
    thr = calibrate_thresholds(rec)
    assert thr["bigrams"] == DEFAULT_THRESHOLDS["bigrams"]  # the a-priori z = 6 separates 20 from 4
    rec["bigrams"]["z_other_top"], rec["bigrams"]["z_max_other"] = [8.0, 2.0], 8.0
    assert calibrate_thresholds(rec)["bigrams"] == 14.0  # it does not: midpoint between 20 and 8
    assert 3.0 < thr["skip_trigrams"] < 8.0            # overlap: keeping all 3 planted (1 FP) beats F1 of 2/3
    assert thr["previous_token"] == DEFAULT_THRESHOLDS["previous_token"]  # nothing planted to calibrate on
    assert thr["induction"] == 0.15  # the default 0.3 does not separate 0.3: midpoint with nothing
    rec["heads"]["induction"] = {"z_planted": [0.5, 0.9], "z_max_other": 0.1, "z_other_top": [0.1]}
    assert calibrate_thresholds(rec)["induction"] == DEFAULT_THRESHOLDS["induction"]  # checked, kept
    rec["heads"]["induction"]["z_other_top"] = [0.4, 0.1]
    assert calibrate_thresholds(rec)["induction"] == 0.45  # disproved: the midpoint


def test_rule_losses_against_the_generator_floor():
    lang = SyntheticLanguage(vocab_size=48, seq_len=24, seed=0)
    tokens, rule, nll = lang.generate(16, return_nll=True)
    model = ToyTransformer(ModelConfig("attention_only_1L", vocab_size=48, d_model=8, n_head=2, n_ctx=24))
    out = rule_losses(model, tokens, rule, nll, batch_size=5, skip_trigrams=lang.rules.skip_trigrams)
    assert out["all"]["count"] == 16 * 23 and abs(out["all"]["loss"] - math.log(48)) < 0.05  # ~uniform init
    assert out["bigram"]["floor"] == 0.0 and out["all"]["floor"] < out["all"]["loss"]
    per_rule = sum(v["count"] for k, v in out.items() if k.startswith("skip_trigram "))
    assert per_rule == out["skip_trigram"]["count"]


def test_context_circuit_equals_the_full_circuit_for_one_layer():
    """Inert (zero-embedding) positions make the minimal-context circuit exact: it matches the path
    expansion of a 1-layer transformer (attention + bilinear MLP) at one offset."""
    torch.manual_seed(0)
    m = ToyTransformer(ModelConfig("transformer_1L", vocab_size=11, d_model=8, n_head=2, n_ctx=8)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    for delta in (1, 3):
        net = torch.cat([t for _, t in context_circuit_slices(m, [delta], prefix=(), dst_chunk=4)])
        paths = torch.cat([t for _, t in C.full_circuit_slices(m, offsets=delta, include_mlp=True)])
        assert paths.abs().max() > 0.1
        torch.testing.assert_close(net.double(), paths, rtol=1e-5, atol=1e-5 * paths.abs().max().item())


def test_filler_circuit_equals_the_full_circuit_for_one_attention_layer():
    """In one attention layer the token at the key position enters the logits only through the query's
    attention to it: centered over that token, the circuit read in any filler context is the full
    circuit at the context's offset (RoPE on), whatever the other tokens."""
    torch.manual_seed(0)
    m = ToyTransformer(ModelConfig("attention_only_1L", vocab_size=11, d_model=8, n_head=2, n_ctx=8)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    contexts = filler_contexts(11, 2, 4, seed=1)
    net = torch.cat([t for _, t in filler_circuit_slices(m, contexts, [1, 3], dst_chunk=4)]).double()
    paths = torch.cat([t for _, t in C.full_circuit_slices(m, offsets=[1, 3])])
    net, paths = net - net.mean(1, keepdim=True), paths - paths.mean(1, keepdim=True)
    assert paths.abs().max() > 0.05
    torch.testing.assert_close(net, paths, rtol=1e-5, atol=1e-5 * paths.abs().max().item())


def test_apply_thresholds_equals_a_recovery_run_at_those_thresholds():
    from bilinear_toys.recovery import apply_thresholds, rule_recovery

    torch.manual_seed(0)
    lang = SyntheticLanguage(vocab_size=40, seq_len=17, seed=1)
    model = ToyTransformer(ModelConfig("attention_only_2L", vocab_size=40, d_model=16, n_head=2, n_ctx=16,
                                       init="unit")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-zero output projections
    rules = lang.rules.to_dict()
    base = rule_recovery(model, rules, max_offset=2)
    assert torch.equal(torch.tensor(base["skip_trigrams"]["contexts"]), filler_contexts(40, 2, 2))
    # the skip-trigram scan leaves out the bigram sources detected at the bigram threshold of the stored
    # run: compare the skip-trigrams at an unchanged bigram threshold
    for thr, keys in (({"bigrams": 1.0, "previous_token": 1.0, "induction": 0.0}, ("bigrams",)),
                      ({"skip_trigrams": 0.7}, ("skip_trigrams",))):
        direct = rule_recovery(model, rules, max_offset=2, thresholds=thr)
        redone = apply_thresholds(base, thr)
        for key in keys:
            assert redone[key]["n_detected"] != base[key]["n_detected"]  # it did re-score
            for field in ("precision", "recall", "detected"):
                assert redone[key][field] == direct[key][field]
        for kind in ("previous_token", "induction"):
            for field in ("precision", "recall", "detected"):
                assert redone["heads"][kind][field] == direct["heads"][kind][field]
