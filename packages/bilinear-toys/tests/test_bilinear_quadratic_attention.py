from __future__ import annotations

import pytest
import torch
from bilinear_toys.ops.quadratic_attention import (
    quadratic_attention,
    quadratic_attention_chunked,
    quadratic_attention_chunkwise,
    quadratic_attention_reference,
    quadratic_attention_step,
)


def qkv(b=2, t=29, h=3, d=6, dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, h, d, generator=g, dtype=dtype),
            torch.randn(b, t, h, d, generator=g, dtype=dtype),
            torch.randn(b, t, h, dv, generator=g, dtype=dtype))


def test_reference_is_the_definition():
    q, k, v = qkv(b=1, t=5, h=1, d=3, dv=2)
    z = quadratic_attention_reference(q, k, v, scale=0.5)
    i = 3
    want = sum((0.5 * q[0, i, 0] @ k[0, j, 0]) ** 2 * v[0, j, 0] for j in range(i + 1))
    torch.testing.assert_close(z[0, i, 0], want)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 64])
def test_chunked_linear_form_equals_masked_form(chunk_size):
    q, k, v = qkv()
    torch.testing.assert_close(quadratic_attention_chunked(q, k, v, chunk_size=chunk_size),
                               quadratic_attention_reference(q, k, v), rtol=1e-12, atol=1e-12)


def test_chunked_state_continues_segments_and_step_decodes():
    q, k, v = qkv(t=20)
    ref = quadratic_attention_reference(q, k, v)
    z1, s = quadratic_attention_chunked(q[:, :12], k[:, :12], v[:, :12], chunk_size=5,
                                        output_final_state=True)
    z2 = quadratic_attention_chunked(q[:, 12:], k[:, 12:], v[:, 12:], chunk_size=5, initial_state=s)
    torch.testing.assert_close(torch.cat([z1, z2], 1), ref, rtol=1e-12, atol=1e-12)
    state = torch.zeros(2, 3, 36, 5, dtype=torch.float64)
    for t in range(20):
        zt, state = quadratic_attention_step(state, q[:, t], k[:, t], v[:, t])
        torch.testing.assert_close(zt, ref[:, t], rtol=1e-12, atol=1e-12)


def test_gradients_agree():
    q, k, v = (x.requires_grad_(True) for x in qkv(t=13))
    w = torch.randn(2, 13, 3, 5, dtype=torch.float64)
    g_ref = torch.autograd.grad((quadratic_attention_reference(q, k, v) * w).sum(), (q, k, v))
    g_lin = torch.autograd.grad((quadratic_attention_chunked(q, k, v, chunk_size=4) * w).sum(), (q, k, v))
    for a, b in zip(g_ref, g_lin):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dispatch_auto_and_errors():
    q, k, v = qkv(t=10)
    ref = quadratic_attention_reference(q, k, v)
    for impl in ("auto", "quadratic", "linear"):
        torch.testing.assert_close(quadratic_attention(q, k, v, impl=impl, crossover=4), ref)
    with pytest.raises(ValueError, match="impl='flash'"):
        quadratic_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"q, k, v: expected \[B, T, H, D\]"):
        quadratic_attention(q, k[:, :3], v)


@pytest.mark.parametrize(("t", "d", "dv", "chunk"), [(37, 8, 8, 16), (20, 6, 20, 16)])
def test_triton_kernel_matches_reference(t, d, dv, chunk):
    pytest.importorskip("triton")
    q, k, v = qkv(b=1, t=t, h=2, d=d, dv=dv, dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(device) for x in (q, k, v))
    z = quadratic_attention(q, k, v, impl="linear", backend="triton", chunk_size=chunk)
    ref = quadratic_attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_matches_reference(dtype):
    pytest.importorskip("triton")
    q, k, v = qkv(b=1, t=37, h=2, d=8, dv=8, dtype=torch.float64)
    w = torch.randn(1, 37, 2, 8, dtype=torch.float64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = [x.to(device, dtype).requires_grad_(True) for x in (q, k, v)]
    ref_in = [x.detach().double().cpu().requires_grad_(True) for x in xs]
    z = quadratic_attention(*xs, impl="linear", backend="triton", chunk_size=16)
    assert z.dtype == dtype
    (z.double().cpu() * w).sum().backward()
    (quadratic_attention_reference(*ref_in) * w).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x, r in zip(xs, ref_in):
        assert x.grad.dtype == dtype
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(x.grad.double().cpu(), r.grad, rtol=tol, atol=tol * scale)


@pytest.mark.gpu
def test_triton_kernel_long_context_gpu():
    q, k, v = (x.cuda() for x in qkv(b=2, t=1000, h=4, d=32, dv=32, dtype=torch.float32))
    z = quadratic_attention(q, k, v, impl="linear", backend="triton")
    ref = quadratic_attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(z.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 64])
def test_chunkwise_form_equals_masked_form_and_continues_segments(chunk_size):
    q, k, v = qkv()
    ref = quadratic_attention_reference(q, k, v)
    torch.testing.assert_close(quadratic_attention_chunkwise(q, k, v, chunk_size=chunk_size), ref,
                               rtol=1e-12, atol=1e-12)
    z1, s = quadratic_attention_chunkwise(q[:, :12], k[:, :12], v[:, :12], chunk_size=chunk_size,
                                          output_final_state=True)
    z2 = quadratic_attention_chunkwise(q[:, 12:], k[:, 12:], v[:, 12:], chunk_size=chunk_size,
                                       initial_state=s)
    torch.testing.assert_close(torch.cat([z1, z2], 1), ref, rtol=1e-12, atol=1e-12)


def test_chunkwise_gradients_agree():
    q, k, v = (x.requires_grad_(True) for x in qkv(t=13))
    w = torch.randn(2, 13, 3, 5, dtype=torch.float64)
    g_ref = torch.autograd.grad((quadratic_attention_reference(q, k, v) * w).sum(), (q, k, v))
    g_lin = torch.autograd.grad((quadratic_attention_chunkwise(q, k, v, chunk_size=4) * w).sum(), (q, k, v))
    for a, b in zip(g_ref, g_lin):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [512, 4096])
def test_triton_backward_long_context_gpu(t):
    q, k, v = (x.cuda().requires_grad_(True) for x in qkv(b=1, t=t, h=4, d=32, dv=32, dtype=torch.float32))
    w = torch.randn_like(v)
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    (quadratic_attention(q, k, v, impl="linear", backend="triton") * w).sum().backward()
    (quadratic_attention_reference(*ref_in) * w.double()).sum().backward()
    for x, r in zip((q, k, v), ref_in):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-3, atol=1e-3 * r.grad.abs().max().item())
