from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from retnet_forgetting.analysis import decay_half_lives, half_life
from retnet_forgetting.ops.retention import states_at_positions
from retnet_forgetting.probes import fit_logistic, fit_ridge, nearest_centroid
from retnet_forgetting.reductions import StateReduction, derotate_states
from retnet_forgetting.reference import RotaryEmbedding
from retnet_forgetting.store import StateStore, estimate_bytes


def test_store_roundtrip_resume_and_layout_check(tmp_path):
    store = StateStore(tmp_path)
    store.create(10, 4, [0, 2], {"query": (2, 3), "readout": (2, 5)}, torch.float16)
    assert [s["stop"] - s["start"] for s in store.pending()] == [4, 4, 2]
    data = {f"{r}.layer_{layer}": torch.randn(10, 2, d)
            for r, d in (("query", 3), ("readout", 5)) for layer in (0, 2)}
    first = store.pending()[0]
    store.write_shard(first, {k: v[:4] for k, v in data.items()})
    resumed = StateStore(tmp_path)
    resumed.create(10, 4, [0, 2], {"query": (2, 3), "readout": (2, 5)}, torch.float16)
    assert [s["start"] for s in resumed.pending()] == [4, 8]
    with pytest.raises(RuntimeError, match="unfinished"):
        resumed.load("query")
    for s in resumed.pending():
        resumed.write_shard(s, {k: v[s["start"]:s["stop"]] for k, v in data.items()})
    got = StateStore(tmp_path).load("query", layers=[2])
    torch.testing.assert_close(got[2], data["query.layer_2"].half().float())
    with pytest.raises(ValueError, match="differs"):
        StateStore(tmp_path).create(10, 5, [0, 2], {"query": (2, 3), "readout": (2, 5)}, torch.float16)
    other = StateStore(tmp_path / "b")
    other.create(2, 2, [0], {"query": (2, 3)})
    with pytest.raises(ValueError, match="expected shape"):
        other.write_shard(other.pending()[0], {"query.layer_0": torch.zeros(2, 3)})
    assert estimate_bytes(100, 2, 32, 10, 256, torch.float16) == 100 * 2 * 32 * 10 * 256 * 2


def test_derotation_makes_states_depend_on_lags_not_positions():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 12, 2, 8, generator=g), torch.randn(1, 12, 2, 4, generator=g)
    rot = RotaryEmbedding(8)
    states = []
    for offset in (0, 37):
        kr = rot.rotate(k, torch.arange(12) + offset)
        s = states_at_positions(kr, v, torch.tensor([11]))
        states.append((s, derotate_states(s, torch.tensor([[11 + offset]]))))
    assert (states[0][0] - states[1][0]).abs().max() > 1e-2  # raw states depend on the absolute position
    torch.testing.assert_close(states[0][1], states[1][1], atol=1e-4, rtol=1e-4)


def test_reductions_shapes_and_determinism():
    s = torch.randn(3, 2, 16, 32)
    for kind, f in (("none", 512), ("bilinear", 24), ("value_mean", 32)):
        r = StateReduction(kind, rank_k=4, rank_v=6)
        assert r(s).shape == (3, 2, f) == (3, 2, r.features(16, 32))
    torch.testing.assert_close(StateReduction(seed=1)(s), StateReduction(seed=1)(s))
    with pytest.raises(ValueError, match=r"StateReduction\.kind: expected one of 'none', 'bilinear', "
                                         r"'value_mean', got 'pca'"):
        StateReduction("pca")


def _separable(G=3, N=300, F=12, C=4, noise=(0.1, 1.0, 100.0)):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (N,), generator=g)
    means = torch.randn(C, F, generator=g) * 3
    X = torch.stack([means[y] + s * torch.randn(N, F, generator=g) for s in noise])
    return X, y


@pytest.mark.parametrize("F", [12, 400])  # primal and dual ridge
def test_ridge_probe_learns_separable_groups_and_not_noise(F):
    X, y = _separable(F=F)
    pr = fit_ridge(X[:, :200], y[:200], X[:, 200:250], y[200:250], 4)
    acc = (pr.predict(X[:, 250:]) == y[250:]).float().mean(1)
    assert acc[0] > 0.95 and acc[2] < 0.6
    assert pr.W.shape == (3, F, 4) and pr.lam.shape == (3,)


def test_logistic_probe_and_nearest_centroid():
    X, y = _separable()
    pr = fit_logistic(X[:, :200], y[:200], X[:, 200:250], y[200:250], 4, max_steps=200)
    acc = (pr.predict(X[:, 250:]) == y[250:]).float().mean(1)
    assert acc[0] > 0.95 and acc[2] < 0.6
    nc = (nearest_centroid(X[:, :200], y[:200], X[:, 250:], 4) == y[250:]).float().mean(1)
    assert nc[0] > 0.95 and nc[2] < 0.6


def test_half_life_interpolation_and_decay_half_lives():
    lags = np.array([10, 100, 1000])
    assert half_life(lags, np.array([0.9, 0.5, 0.1]), 0.1) == pytest.approx(100.0)
    assert half_life(lags, np.array([0.9, 0.9, 0.9]), 0.1) == math.inf
    assert math.isnan(half_life(lags, np.array([0.1, 0.1, 0.1]), 0.1))
    hl = decay_half_lives(10)
    assert hl[0] == pytest.approx(21.83, abs=0.01) and hl[9] == pytest.approx(11356.2, rel=1e-3)
