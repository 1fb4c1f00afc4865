"""A 2-layer polynomial transformer learns to predict repeated random tokens (CPU, seconds).

The repeat period is fixed here, so a layer-1 head may find the earlier occurrence by its RoPE offset
rather than by content (K-composition); with variable periods true induction takes ~1000+ steps (see
``bench/gpu_rule_recovery.py``). What is asserted: the repeat is predicted, a layer-1 head attends to the
token after the earlier occurrence more than any layer-0 head, and the network stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from bilinear_toys import ModelConfig, ToyTransformer
from bilinear_toys.circuits import head_scores_behaviour, logits_from_network
from bilinear_toys.data import repeated_random_tokens
from seqmem_shared.optim import build_optimizer


def test_attention_only_2l_learns_induction():
    vocab, half = 16, 8
    torch.manual_seed(0)
    model = ToyTransformer(ModelConfig("attention_only_2L", vocab_size=vocab, d_model=32, n_head=2,
                                       n_ctx=2 * half + 1, init="unit"))
    opt = build_optimizer(model, name="muon", lr=3e-2, weight_decay=0.0)
    for step in range(90):
        x = repeated_random_tokens(vocab, half, 32, seed=step, bos=0)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    x = repeated_random_tokens(vocab, half, 64, seed=10_000, bos=0)
    with torch.no_grad():
        logits = model(x[:, :-1])
    repeated = F.cross_entropy(logits[:, half + 1:].flatten(0, 1), x[:, half + 2:].flatten()).item()
    fresh = F.cross_entropy(logits[:, 1:half].flatten(0, 1), x[:, 2:half + 1].flatten()).item()
    assert fresh > 0.8 * math.log(vocab)  # the first half is random: nothing to learn
    assert repeated < 1.0, repeated        # the repeat is predicted: induction
    scores = head_scores_behaviour(model, half=half, tokens=x[:, 1:])
    assert scores["induction"][1].max() > scores["induction"][0].max()
    torch.testing.assert_close(logits_from_network(model.double(), x[:4, :-1]),
                               model(x[:4, :-1]).detach(), rtol=1e-8, atol=1e-8)
