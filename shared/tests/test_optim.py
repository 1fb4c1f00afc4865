"""seqmem_shared.optim: parameter routing, Muon (vs torch.optim.Muon), MuonAdamW, warmup-cosine, clipping."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from seqmem_shared.optim import (
    Muon,
    MuonAdamW,
    build_optimizer,
    classify_parameters,
    clip_grad_norm,
    cosine_with_warmup,
    newton_schulz,
    param_groups,
)
from torch import nn

VOCAB, D = 40, 16
HAS_TORCH_MUON = hasattr(torch.optim, "Muon")


class MambaLikeMixer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(2 * d, 2 * d, kernel_size=4, groups=2 * d, padding=3)
        self.x_proj = nn.Linear(2 * d, 8, bias=False)
        self.A_log = nn.Parameter(torch.zeros(2 * d, 4))  # 2-D, as in Mamba-1
        self.dt_bias = nn.Parameter(torch.zeros(2 * d))
        self.D = nn.Parameter(torch.ones(2 * d))
        self.vocab_sized = nn.Linear(d, VOCAB)  # out_features == vocab inside a numbered block: hidden
        self.out_proj = nn.Linear(2 * d, d)


class ToyLM(nn.Module):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.pos_embedding = nn.Parameter(torch.zeros(8, D))
        self.layers = nn.ModuleList([MambaLikeMixer(D) for _ in range(2)])
        self.attn = nn.MultiheadAttention(D, 2)
        self.norm_f = nn.RMSNorm(D)
        self.gain = nn.Parameter(torch.ones(()))
        self.flagged = nn.Parameter(torch.zeros(D, D))
        self.flagged._no_weight_decay = True
        self.frozen = nn.Parameter(torch.zeros(D, D), requires_grad=False)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embedding.weight
        self.proj_out = nn.Linear(D, VOCAB)  # untied head found by its out_features


def _names(cats: dict, key: str) -> set[str]:
    return {n for n, _ in cats[key]}


def test_routing_of_every_parameter_kind():
    model = ToyLM(tied=True)
    cats = classify_parameters(model)
    layer = {f"layers.{i}.{n}" for i in range(2) for n in ("in_proj.weight", "x_proj.weight",
                                                            "vocab_sized.weight", "out_proj.weight")}
    assert _names(cats, "muon") == layer | {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert _names(cats, "adamw") == {"embedding.weight", "pos_embedding", "proj_out.weight",
                                     "layers.0.conv1d.weight", "layers.1.conv1d.weight"}
    per_layer = ("norm.weight", "norm.bias", "conv1d.bias", "A_log", "dt_bias", "D", "vocab_sized.bias",
                 "out_proj.bias")
    no_decay = {f"layers.{i}.{n}" for i in range(2) for n in per_layer}
    assert _names(cats, "adamw_no_decay") == no_decay | {"attn.in_proj_bias", "attn.out_proj.bias",
                                                         "norm_f.weight", "gain", "flagged", "proj_out.bias"}
    # each trainable parameter exactly once (the tied head only as the embedding), frozen ones nowhere
    ids = [id(p) for c in cats.values() for _, p in c]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.frozen) not in ids
    assert all(p.ndim == 2 for _, p in cats["muon"])


def test_untied_head_by_name_and_groups():
    model = ToyLM(tied=False)
    cats = classify_parameters(model)
    assert "lm_head.weight" in _names(cats, "adamw")
    groups = param_groups(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    assert [(g["use_muon"], g["weight_decay"], g["lr"]) for g in groups] == [
        (True, 0.1, 0.02), (False, 0.1, 1e-3), (False, 0.0, 1e-3)]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert "lr" not in param_groups(model)[0]


def test_muon_filter_overrides_the_rule():
    model = ToyLM()
    cats = classify_parameters(model, muon_filter=lambda n, p: False if "x_proj" in n else
                               (True if n == "pos_embedding" else None))
    assert "layers.0.x_proj.weight" in _names(cats, "adamw")
    assert "pos_embedding" in _names(cats, "muon")
    with pytest.raises(ValueError, match="conv1d.weight.*2-D"):
        classify_parameters(model, muon_filter=lambda n, p: True if "conv1d.weight" in n else None)


def test_build_adamw_splits_decay():
    model = ToyLM()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert any(p is model.layers[0].in_proj.weight for p in decay["params"])
    assert any(p is model.layers[0].A_log for p in no_decay["params"])
    assert decay["fused"] is False  # CPU parameters
    with pytest.raises(ValueError, match="name='sgd'"):
        build_optimizer(model, "sgd")


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 40, 24)])
def test_newton_schulz_orthogonalizes(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.65 and sv.max() < 1.2  # the quintic's band around 1 (not exactly 1)
    # it keeps the singular vectors: out ~ U diag(f(s)) V^T with G = U diag(s) V^T
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    core = u.mT @ out.double() @ vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    assert torch.allclose(core, torch.diag_embed(diag), atol=0.02) and diag.min() > 0.65


def _matrices(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(r, c, generator=gen) for r, c in ((24, 12), (12, 24), (16, 16))[:n]]


def _run_muon(opt_cls, steps: int = 3, **kwargs) -> list[torch.Tensor]:
    params = [nn.Parameter(w.clone()) for w in _matrices()]
    opt = opt_cls(params, lr=0.02, weight_decay=0.1, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_matches_torch_muon(adjust_lr_fn):
    ref = _run_muon(torch.optim.Muon, adjust_lr_fn=adjust_lr_fn)
    exact = _run_muon(Muon, adjust_lr_fn=adjust_lr_fn, ns_dtype=torch.float64)
    ours_bf16 = _run_muon(Muon, adjust_lr_fn=adjust_lr_fn, ns_dtype=torch.bfloat16)
    ours_fp32 = _run_muon(Muon, adjust_lr_fn=adjust_lr_fn)
    for r, e, b, f, w0 in zip(ref, exact, ours_bf16, ours_fp32, _matrices()):
        moved = (e - w0).abs().max()
        assert moved > 0.01
        assert (r - e).abs().max() < 0.03 * moved  # torch's bf16 iteration vs the fp64 one: same math
        assert (b - r).abs().max() < 1e-3 * moved  # ours in bf16: the same fused ops as torch's
        assert (f - e).abs().max() < 1e-3 * moved  # ours in fp32 (the CPU default)


def test_muon_decreases_least_squares_loss():
    gen = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(64, 12, generator=gen), torch.randn(8, 12, generator=gen)
    y = x @ w_true.T
    w = nn.Parameter(torch.zeros(8, 12))
    opt = Muon([w], lr=0.3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 40)
    losses = []
    for _ in range(40):
        loss = (x @ w.T - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < 0.1 * losses[0]
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(3))])


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 8), generator=gen)
        h = model.embedding(tokens) + model.pos_embedding
        for layer in model.layers:
            h = h + layer.out_proj(torch.nn.functional.silu(layer.in_proj(layer.norm(h))) * layer.D)
        logits = model.lm_head(model.norm_f(h)) * model.gain
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        sched.step()


@pytest.mark.parametrize("name,impl", [("muon", "seqmem"), ("muon", "auto"), ("adamw", "auto")])
def test_state_dict_round_trip_gives_identical_steps(name, impl):
    torch.manual_seed(0)
    model = ToyLM()
    opt = build_optimizer(model, name, lr=3e-3, weight_decay=0.1, muon_impl=impl)
    sched = cosine_with_warmup(opt, 2, 10)
    _train(model, opt, sched, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _train(model, opt, sched, 3, seed=1)

    clone = ToyLM()
    opt2 = build_optimizer(clone, name, lr=3e-3, weight_decay=0.1, muon_impl=impl)
    sched2 = cosine_with_warmup(opt2, 2, 10)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    clone.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _train(clone, opt2, sched2, 3, seed=1)
    for (n, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), n
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_muon_adamw_is_one_optimizer():
    model = ToyLM()
    opt = build_optimizer(model, "muon", lr=1e-2, adamw_lr=1e-3, adjust_lr_fn="original", muon_impl="seqmem")
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, Muon)
    assert isinstance(opt.adamw, torch.optim.AdamW)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3, 1e-3]
    # children share the group dicts and the state, so schedulers and state_dict see everything
    assert opt.muon.param_groups[0] is opt.param_groups[0] and opt.adamw.state is opt.state
    sched = cosine_with_warmup(opt, 0, 4, min_lr_ratio=0.5)
    _train(model, opt, sched, 2, seed=0)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1e-2 * (0.5 + 0.25 * (1 + math.cos(math.pi / 2))))
    used = {p for p in model.parameters() if p.grad is not None}  # _train leaves some parameters unused
    assert set(opt.state) == used and len(used) > 10
    assert "momentum_buffer" in opt.state[model.layers[0].in_proj.weight]
    assert "exp_avg" in opt.state[model.embedding.weight]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # closure evaluated once
    calls = []
    opt.step(lambda: calls.append(1) or torch.tensor(0.0))
    assert calls == [1]
    # a state dict whose groups are routed differently is refused
    sd = opt.state_dict()
    sd["param_groups"][0]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="use_muon"):
        MuonAdamW([{"params": [model.gain]}])


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch >= 2.9")
def test_torch_muon_state_loads_into_ours():
    torch.manual_seed(0)
    model = ToyLM()
    opt = build_optimizer(model, "muon", muon_impl="torch")
    assert isinstance(opt.muon, torch.optim.Muon)
    _train(model, opt, cosine_with_warmup(opt, 0, 5), 2, seed=0)
    ours = build_optimizer(model, "muon", muon_impl="seqmem")
    ours.load_state_dict(copy.deepcopy(opt.state_dict()))
    w = model.layers[0].in_proj.weight
    assert torch.equal(ours.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_grad_scaler_unscales_through_param_groups():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except (AttributeError, RuntimeError, TypeError) as exc:  # older torch: no CPU GradScaler
        pytest.skip(f"no CPU GradScaler: {exc}")
    results = []
    for scale in (True, False):
        torch.manual_seed(0)
        model = ToyLM()
        opt = build_optimizer(model, "muon", lr=1e-2, muon_impl="seqmem")
        hidden = model.embedding(torch.arange(8)) @ model.layers[0].in_proj.weight[:D].T
        loss = model.lm_head(hidden).square().mean()
        if scale:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def _lrs(warmup: int, total: int, ratio: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_with_warmup(opt, warmup, total, min_lr_ratio=ratio)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_values():
    f = _lrs(4, 14, 0.1, 20)
    assert f[0] == pytest.approx(1 / 5) and f[3] == pytest.approx(4 / 5)
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert f[14] == pytest.approx(0.1) and f[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert _lrs(0, 10, 0.0, 1) == [pytest.approx(1.0)]
    assert _lrs(3, 3, 0.2, 5)[3:] == [pytest.approx(0.2)] * 2


@pytest.mark.parametrize("kwargs,field", [({"warmup_steps": -1}, "warmup_steps"),
                                          ({"total_steps": 0}, "total_steps"),
                                          ({"warmup_steps": 11}, "warmup_steps"),
                                          ({"min_lr_ratio": 1.5}, "min_lr_ratio")])
def test_cosine_with_warmup_rejects_bad_args(kwargs, field):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    args = {"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 0.1} | kwargs
    with pytest.raises(ValueError, match=f"^{field}="):
        cosine_with_warmup(opt, **args)


def test_clip_grad_norm():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert clip_grad_norm(model, 1.0) == 0.0  # no gradients yet
    model(torch.ones(3, 4)).sum().mul(100).backward()
    model[1].bias.grad = None  # skipped, not an error
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert expected > 1.0
    assert clip_grad_norm(model, 1.0) == pytest.approx(expected, rel=1e-5)
    after = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.linalg.vector_norm(after).item() == pytest.approx(1.0, rel=1e-4)
    # iterable of params, and max_norm=inf only measures
    assert clip_grad_norm(iter(model.parameters()), math.inf) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(model, 0.0)
