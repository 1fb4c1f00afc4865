"""RMSNorm: the reference against the formula and PyTorch, the Triton kernel against the reference.

On CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by the root conftest)
on tiny shapes; the split-row path is forced with a small ``max_block``. Tolerances are relative
errors ``||a - b|| / ||b||``: float32 1e-5; bfloat16 2e-2 under the interpreter, whose float32 ->
bfloat16 cast truncates where the GPU rounds to nearest (one bf16 ulp is 2^-8 relative), and 4e-3
on the GPU (only summation order differs there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from seqmem_shared.kernels.rms_norm import RMSNorm, rms_norm, rms_norm_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 4e-3 if ON_GPU else 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(fn, x, weight, residual, dy, dh):
    """Forward and backward of ``fn``; returns outputs then the grads of x, weight, residual."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, residual)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, (dy, dh)[: len(outs)])
    return [*outs, *(t.grad for t in leaves if t is not None)]


def make(rows: tuple[int, ...], d: int, dtype, w_dtype=None, res_dtype=None, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda shape, dt: torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dt)
    x = rnd((*rows, d), dtype) * 2
    weight = None if w_dtype is None else (1 + 0.3 * rnd((d,), torch.float32)).to(w_dtype)
    residual = None if res_dtype is None else rnd((*rows, d), res_dtype)
    dy = rnd((*rows, d), dtype)
    dh = None if res_dtype is None else rnd((*rows, d), torch.promote_types(dtype, res_dtype))
    return x, weight, residual, dy, dh


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_gradcheck_fp64(with_residual: bool) -> None:
    x, w, r, _, _ = make((3, 2), 7, torch.float64, torch.float64, torch.float64 if with_residual else None)
    inputs = tuple(t.requires_grad_() for t in (x, w, r) if t is not None)
    fn = (lambda x, w, r: rms_norm_reference(x, w, 1e-5, r)) if with_residual else (
        lambda x, w: rms_norm_reference(x, w, 1e-5))
    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_matches_formula_and_torch() -> None:
    x, w, _, _, _ = make((4, 5), 48, torch.float32, torch.float32, device="cpu")
    manual = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert rel_err(rms_norm_reference(x, w), manual) < 1e-6
    if hasattr(F, "rms_norm"):
        assert rel_err(rms_norm_reference(x, w, 1e-5), F.rms_norm(x, (48,), w, 1e-5)) < 1e-6
    assert rel_err(rms_norm_reference(x), manual / w) < 1e-6


def test_reference_computes_in_fp32_and_keeps_an_fp32_residual_stream() -> None:
    x, w, r, _, _ = make((6,), 64, torch.bfloat16, torch.float32, torch.float32, device="cpu")
    y, h = rms_norm_reference(x, w, 1e-6, r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, x.float() + r)
    # y is the norm of h as returned, computed in fp32 and rounded once
    expect = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.equal(y, expect.to(torch.bfloat16))
    y2, h2 = rms_norm_reference(x, w.bfloat16(), 1e-6, r.bfloat16())
    assert h2.dtype == torch.bfloat16 and torch.equal(y2, rms_norm_reference(h2, w.bfloat16()))


# ------------------------------------------------------------------------ triton (interpreter on CPU)
SHAPES = [  # rows, d, max_block (None: default, single pass)
    ((3,), 8, None),
    ((17,), 33, None),
    ((5, 3), 256, None),
    ((7,), 33, 16),  # split-row: 3 column tiles, last one ragged
    ((2, 3), 256, 64),  # split-row: 4 column tiles
]


def triton_fn(max_block: int | None):
    if max_block is None:
        return lambda x, w, r: rms_norm(x, w, 1e-6, r, backend="triton")
    from seqmem_shared.kernels.rms_norm.triton import rms_norm_triton

    return lambda x, w, r: rms_norm_triton(x, w, 1e-6, r, max_block=max_block)


@pytest.mark.parametrize("rows,d,max_block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("res", ["none", "same", "fp32"])
def test_triton_matches_reference(rows, d, max_block, dtype, res) -> None:
    res_dtype = {"none": None, "same": dtype, "fp32": torch.float32}[res]
    args = make(rows, d, dtype, dtype, res_dtype, seed=d + len(rows))
    got = run(triton_fn(max_block), *args)
    want = run(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), *args)
    has_res = res_dtype is not None
    names = ["y", "h"][: 1 + has_res] + ["dx", "dweight", "dresidual"][: 2 + has_res]
    for name, a, b in zip(names, got, want, strict=True):
        assert rel_err(a, b) < TOL[a.dtype], name


@pytest.mark.parametrize("max_block", [None, 16])
def test_triton_mixed_dtypes_no_weight_and_partial_grads(max_block) -> None:
    fn = triton_fn(max_block)
    ref = lambda x, w, r: rms_norm_reference(x, w, 1e-6, r)
    # fp32 weight under bf16 activations: dweight comes back fp32
    args = make((9,), 40, torch.bfloat16, torch.float32)
    for name, a, b in zip(["y", "dx", "dweight"], run(fn, *args), run(ref, *args), strict=True):
        assert rel_err(a, b) < TOL[a.dtype], name
    # no weight
    x, _, _, dy, _ = make((4,), 40, torch.float32)
    for a, b in zip(run(fn, x, None, None, dy, None), run(ref, x, None, None, dy, None), strict=True):
        assert rel_err(a, b) < 1e-5
    # only the new residual is used downstream (y gets no gradient), and vice versa
    x, w, r, dy, dh = make((4,), 40, torch.float32, torch.float32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    fn(*leaves)[1].backward(dh)
    assert torch.equal(leaves[0].grad, dh) and torch.equal(leaves[2].grad, dh) and leaves[1].grad is None
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    fn(*leaves)[0].backward(dy)
    got = [t.grad for t in leaves]
    want = run(ref, x, w, r, dy, torch.zeros_like(dh))[2:]
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5
    # x alone requires grad: weight's grad is skipped, x's grad is unchanged
    xl = x.clone().requires_grad_()
    fn(xl, w, None).backward(dy)
    assert rel_err(xl.grad, run(ref, x, w, None, dy, None)[1]) < 1e-5


def test_triton_non_contiguous_and_empty_inputs() -> None:
    x, w, _, dy, _ = make((6,), 12, torch.float32, torch.float32)
    xt = x.reshape(3, 2, 12).transpose(0, 1)  # rows not in memory order
    got = rms_norm(xt, w, backend="triton")
    assert rel_err(got, rms_norm_reference(xt, w)) < 1e-5
    # gradients through a non-contiguous input, and from .sum() (an expanded, stride-0 dy)
    grads = []
    for fn in (lambda a, b: rms_norm(a, b, backend="triton"), rms_norm_reference):
        xl, wl = xt.detach().requires_grad_(), w.detach().clone().requires_grad_()
        fn(xl, wl).sum().backward()
        grads.append((xl.grad, wl.grad))
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-5
    w_strided = torch.stack([w, w], -1)[:, 0]  # a weight with stride 2
    assert rel_err(rms_norm(xt, w_strided, backend="triton"), rms_norm_reference(xt, w)) < 1e-5
    empty = torch.empty(0, 12, device=DEVICE)
    assert rms_norm(empty, w, backend="triton").shape == (0, 12)


def test_auto_backend_and_float64() -> None:
    x, w, _, _, _ = make((3,), 16, torch.float64, torch.float64)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))  # auto -> reference for float64
    with pytest.raises(TypeError, match="backend='triton'.*float64"):
        rms_norm(x, w, backend="triton")
    if not ON_GPU:
        xc = x.float().cpu()
        assert torch.equal(rms_norm(xc, w.float().cpu()), rms_norm_reference(xc, w.float().cpu()))


def test_public_import_path_gives_the_function() -> None:
    from seqmem_shared.kernels import RMSNorm as PublicRMSNorm
    from seqmem_shared.kernels import rms_norm as public_rms_norm

    assert public_rms_norm is rms_norm and PublicRMSNorm is RMSNorm


# ------------------------------------------------------------------------------------------ errors and module
def test_bad_inputs_name_the_field() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*got \(7,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 8\)"):
        rms_norm(x, torch.ones(8), residual=torch.randn(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        rms_norm(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="backend="):
        rms_norm(x, backend="cuda")
    with pytest.raises(ValueError, match="dim must be positive"):
        RMSNorm(0)


def test_module() -> None:
    norm = RMSNorm(16, eps=1e-5, dtype=torch.float64)
    assert norm.weight.shape == (16,) and norm.weight.dtype == torch.float64 and torch.all(norm.weight == 1)
    with torch.no_grad():
        norm.weight.mul_(torch.linspace(0.5, 1.5, 16, dtype=torch.float64))
    x, r = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-5))
    y, h = norm(x, r)
    assert torch.equal(h, x + r) and torch.equal(y, rms_norm_reference(x + r, norm.weight, 1e-5))
    assert "elementwise_affine=True" in repr(norm)
    bare = RMSNorm(16, elementwise_affine=False)
    assert bare.weight is None and list(bare.parameters()) == []
    norm.reset_parameters()
    assert torch.all(norm.weight == 1)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 4096, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("res", ["none", "same", "fp32"])
def test_gpu_matches_reference(d, dtype, res) -> None:
    res_dtype = {"none": None, "same": dtype, "fp32": torch.float32}[res]
    rows = (2, 1000) if d <= 4096 else (300,)  # includes a ragged last row tile
    w_dtype = torch.float32 if res == "fp32" else dtype
    args = make(rows, d, dtype, w_dtype, res_dtype, device="cuda", seed=d)
    got = run(lambda x, w, r: rms_norm(x, w, 1e-6, r, backend="triton"), *args)
    want = run(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), *args)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < TOL[a.dtype], (i, a.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [4096, 65536])
def test_gpu_backward_is_deterministic(d) -> None:
    x, w, _, dy, _ = make((777,), d, torch.bfloat16, torch.float32, device="cuda")
    first = run(lambda x, w, r: rms_norm(x, w, backend="triton"), x, w, None, dy, None)
    for _ in range(2):
        again = run(lambda x, w, r: rms_norm(x, w, backend="triton"), x, w, None, dy, None)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
