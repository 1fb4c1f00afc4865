from __future__ import annotations

import math

import pytest
import torch
from retnet_forgetting.ops.retention import (
    chunk_output,
    chunk_states,
    retention,
    retention_log_decay,
    states_at_positions,
)


def _qkv(B=2, T=37, H=3, Dk=8, Dv=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=g).to(dtype) for d in (Dk, Dk, Dv))


def _prefix_state(k, v, t):
    """S_t by direct summation: sum_{i<=t} gamma^(t-i) k_i^T v_i (float64)."""
    g = retention_log_decay(k.shape[2]).double().exp()
    w = g[None, :] ** torch.arange(t, -1, -1, dtype=torch.float64)[:, None]  # [t+1, H]
    return torch.einsum("bihk,ih,bihv->bhkv", k[:, : t + 1].double(), w, v[:, : t + 1].double())


def test_decay_matches_retnet_formula():
    gam = retention_log_decay(10).exp()
    assert torch.allclose(gam, torch.tensor([1 - 2.0 ** (-5 - h) for h in range(10)]))
    half_lives = math.log(0.5) / retention_log_decay(10)
    assert 21 < half_lives[0] < 23 and 11_000 < half_lives[-1] < 11_500


@pytest.mark.parametrize("T", [1, 16, 37, 64, 130])
def test_three_forms_agree(T):
    q, k, v = _qkv(T=T)
    o_par, _ = retention(q, k, v, mode="parallel")
    o_rec, s_rec = retention(q, k, v, mode="recurrent", output_final_state=True)
    o_chk, s_chk = retention(q, k, v, mode="chunk", output_final_state=True)
    torch.testing.assert_close(o_rec, o_par, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o_chk, o_par, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_chk, s_rec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_rec.double(), _prefix_state(k, v, T - 1), atol=1e-4, rtol=1e-4)


def test_scale_is_on_q_only_and_state_unscaled():
    q, k, v = _qkv(T=5, Dk=16)
    _, s = retention(q, k, v, mode="recurrent", output_final_state=True)
    torch.testing.assert_close(s.double(), _prefix_state(k, v, 4), atol=1e-5, rtol=1e-5)
    o_unscaled, _ = retention(q, k, v, mode="chunk", scale=1.0)
    o_default, _ = retention(q, k, v, mode="chunk")  # default scale 16^-0.5 = 0.25, on q only
    torch.testing.assert_close(o_default, 0.25 * o_unscaled, atol=1e-5, rtol=1e-5)


def test_initial_state_continues_the_sequence():
    q, k, v = _qkv(T=50)
    o_full, s_full = retention(q, k, v, mode="chunk", output_final_state=True)
    o_a, s_a = retention(q[:, :21], k[:, :21], v[:, :21], mode="chunk", output_final_state=True)
    o_b, s_b = retention(q[:, 21:], k[:, 21:], v[:, 21:], mode="chunk", initial_state=s_a,
                         output_final_state=True)
    torch.testing.assert_close(torch.cat([o_a, o_b], 1), o_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_b, s_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_states_at_positions_equal_prefix_states(chunk_size):
    _, k, v = _qkv(T=45)
    positions = torch.tensor([[0, 3, 4, 15, 16, 44], [44, 7, 31, 32, 1, 0]])
    h = chunk_states(k, v, chunk_size)
    assert h.shape == (2, -(-45 // chunk_size), 3, 8, 12)
    got = states_at_positions(k, v, positions, h=h, chunk_size=chunk_size)
    for b in range(2):
        for j, t in enumerate(positions[b].tolist()):
            torch.testing.assert_close(got[b, j].double(), _prefix_state(k[b:b + 1], v[b:b + 1], t)[0],
                                       atol=1e-4, rtol=1e-4)


def test_bf16_inputs_accumulate_in_fp32():
    _, k, v = _qkv(T=300, dtype=torch.bfloat16)
    got = states_at_positions(k, v, torch.tensor([299]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, 0].double(), _prefix_state(k, v, 299), atol=1e-3, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(T=8)
    with pytest.raises(ValueError, match="positions"):
        states_at_positions(k, v, torch.tensor([8]))
    with pytest.raises(ValueError, match="mode"):
        retention(q, k, v, mode="fused")
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        retention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="backend"):
        retention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='triton': expected one of \('auto', 'torch', 'fla'\)"):
        chunk_states(k, v, backend="triton")  # the Triton correction is for states at positions only
    with pytest.raises(ValueError, match="backend='cuda': expected one of .*'triton'"):
        states_at_positions(k, v, torch.tensor([3]), backend="cuda")
    with pytest.raises(RuntimeError, match="fla"):
        retention(q, k, v, backend="fla")


def test_chunk_output_from_given_states_equals_chunk_retention():
    q, k, v = _qkv(T=70)
    o, _ = retention(q, k, v, mode="chunk")
    h = chunk_states(k, v, 16)
    torch.testing.assert_close(chunk_output(q, k, v, h, chunk_size=16), o, atol=1e-5, rtol=1e-4)
    h16 = chunk_states(k.bfloat16(), v.bfloat16(), 16, fp32_states=False)  # as fla's forward keeps them
    assert h16.dtype == torch.bfloat16
    o16 = chunk_output(q.bfloat16(), k.bfloat16(), v.bfloat16(), h16, chunk_size=16)
    assert o16.dtype == torch.bfloat16 and _rel(o16, o) < 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_in_chunk_correction_matches_reference(dtype):
    """Runs the Triton kernel (CPU interpreter without CUDA; conftest sets TRITON_INTERPRET=1).

    ``"ieee"`` multiplies the exact fp32 values (tolerance 1e-4); ``"fast"`` rounds the decay-weighted
    values to the inputs' dtype (bf16: 2^-8 relative per entry at most, so 1e-2 in norm) and, for bf16
    states, each output entry once more."""
    from seqmem_shared.backends import triton_status

    if not triton_status()[0]:
        pytest.skip(triton_status()[1])
    _, k, v = _qkv(B=2, T=45, H=2, Dk=16, Dv=32, dtype=dtype)
    if torch.cuda.is_available():
        k, v = k.cuda(), v.cuda()
    positions = torch.tensor([[0, 15, 16, 44], [44, 3, 31, 32]])
    ref = states_at_positions(k, v, positions, chunk_size=16, backend="torch")
    got = states_at_positions(k, v, positions, chunk_size=16, backend="triton", precision="ieee")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:  # "auto" is IEEE for fp32 inputs; positions grouped by chunk
        from retnet_forgetting.ops.retention.positions import position_groups
        from retnet_forgetting.ops.retention.triton_states import states_at_positions_triton

        auto = states_at_positions(k, v, positions, chunk_size=16, backend="triton")
        torch.testing.assert_close(auto, ref, atol=1e-4, rtol=1e-4)
        # many positions per chunk (more than a group holds), unsorted, repeated, across rows
        many = torch.tensor([[15, *range(12), 3, 3, 44, 40, 16],
                             [44, 0, 1, 2, 31, 30, 29, 28, 17, 16, 5, 4, 3, 2, 2, 1, 0, 33]])
        groups = position_groups(many, 16, max_group=4, device=k.device)
        assert int(groups.count.max()) <= 4 and int(groups.count.sum()) == many.numel()
        grouped = states_at_positions_triton(k, v, many.to(k.device), chunk_states(k, v, 16),
                                             retention_log_decay(2, k.device), 16, groups=groups)
        want = states_at_positions(k, v, many, chunk_size=16, backend="torch")
        torch.testing.assert_close(grouped, want, atol=1e-4, rtol=1e-4)
        return
    h16 = chunk_states(k, v, 16, fp32_states=False)
    for h in (None, h16):
        fast = states_at_positions(k, v, positions.to(k.device), h=h, chunk_size=16, backend="triton",
                                   out_dtype=torch.bfloat16, precision="fast", checked=True)
        assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
        assert _rel(fast, ref) < 1e-2
        torch.testing.assert_close(fast.float(), ref, atol=5e-2 * float(ref.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="precision"):
        states_at_positions(k, v, positions, chunk_size=16, backend="triton", precision="tf32")


def test_position_groups_cover_each_position_once_by_row_and_chunk():
    from retnet_forgetting.ops.retention.positions import position_groups

    pos = torch.tensor([[9, 0, 70, 3, 3, 64, 1, 2, 5], [8, 8, 8, 0, 130, 129, 7, 6, 63]])
    g = position_groups(pos, 64, max_group=3)
    assert sorted(g.order.tolist()) == list(range(pos.numel()))
    flat = pos.reshape(-1)
    for first, count in zip(g.first.tolist(), g.count.tolist()):
        members = g.order[first:first + count]
        assert 1 <= count <= 3
        assert len({(int(i) // 9, int(flat[i]) // 64) for i in members}) == 1  # one row, one chunk
        assert flat[members].tolist() == sorted(flat[members].tolist())
    assert g.first.numel() == 8  # per row: chunk 0 holds 7 positions (3 groups), another chunk 2 (1 group)


def test_reference_accumulates_in_fp32_under_autocast():
    """bf16 autocast (training on CUDA) would run the reference's einsums in bf16; it is turned off inside."""
    from retnet_forgetting.ops.retention import reference

    q, k, v = _qkv(T=70)
    plain_o, plain_s = reference.chunk_retention(q, k, v, output_final_state=True)
    plain_p = reference.parallel_retention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = reference.chunk_retention(q, k, v, output_final_state=True)
        p = reference.parallel_retention(q, k, v)
    for got, want in ((o, plain_o), (s, plain_s), (p, plain_p)):
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("capability, version, hazard", [
    ((9, 0), "3.6.0", True), ((9, 0), "3.4.0", True), ((9, 0), "3.7.0+gitabc", True),
    ((9, 0), "3.7.1", False), ((9, 0), "3.3.1", False), ((8, 0), "3.6.0", False), ((10, 0), "3.6.0", False),
])
def test_fla_backward_hazard_is_hopper_with_triton_3_4_to_3_7_1(capability, version, hazard):
    from retnet_forgetting.ops.retention import fla_backward_hazard

    reason = fla_backward_hazard(capability, version)
    assert (reason is not None) == hazard
    if hazard:
        assert version in reason and "#640" in reason


def test_gradients_avoid_fla_where_its_backward_is_miscompiled(monkeypatch):
    """Where fla's chunk backward is known to be broken, ``auto`` runs retention with gradients in
    PyTorch (inference stays on fla) and an explicit ``fla`` is an error."""
    import retnet_forgetting.ops.retention as ops

    monkeypatch.setattr(ops, "resolve_backend",
                        lambda backend, *t, fast: "torch" if backend == "torch" else fast)
    monkeypatch.setattr(ops, "optional_import", lambda *a: object())
    monkeypatch.setattr(ops, "fla_backward_hazard_on", lambda device: "Triton 3.6.0 miscompiles it")
    q, k, v = _qkv()
    assert ops._backend("auto", q, k, v) == "fla"
    assert ops._backend("auto", q, k, v, backward=True) == "torch"
    with pytest.raises(RuntimeError, match="backend='fla': Triton 3.6.0"):
        ops._backend("fla", q, k, v, backward=True)
    q.requires_grad_(True)
    o, _ = retention(q, k, v, backend="auto")  # would import fla's kernels if it chose fla
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(RuntimeError, match="backend='fla'"):
        retention(q, k, v, backend="fla")
