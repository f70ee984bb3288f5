"""The kernel-covariance core of the Schur-complement op through every backend that runs here, against
the float64 reference; gradients, compile, bad input."""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.ops.schur_covariance import kernel_covariance, schur_covariance_gram
from clipfast.reference.schur_covariance import COVARIANCES, kernel_covariance_reference
from clipfast.testing import assert_close_to_reference

CPU_BACKENDS = backends.available_backends("schur_covariance", "cpu")
SHAPES = {"tiny": (1, 5, 3), "odd": (2500, 33, 20), "wide": (3001, 128, 64)}
INTERPRETER_SHAPES = {"tiny": (1, 5, 3), "odd": (61, 19, 5)}  # the Triton interpreter is ~1000x slower
CASES = [
    pytest.param(b, shape, dtype, id=f"{b}-{name}-{str(dtype)[6:]}")
    for b in CPU_BACKENDS for name, shape in (INTERPRETER_SHAPES if b == "triton" else SHAPES).items()
    for dtype in (torch.float64, torch.float32) if dtype in backends.DTYPES[b]
]


def _inputs(n, d, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, d, generator=g, dtype=torch.float64)
    image = (0.6 * text + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64))  # correlated pairs
    omegas = torch.randn(d, m, generator=g, dtype=torch.float64) / 3.5
    return (image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_(), omegas.to(dtype))


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_matches_float64_reference(backend, shape, dtype, covariance):
    n, d, m = shape
    image, text, omegas = _inputs(n, d, m, dtype)
    w = omegas if covariance == "rff" else None
    with clipfast.use_backend(backend):
        blocks = kernel_covariance(image, text, covariance, w)
    upstream = [torch.randn(b.shape, dtype=torch.float64) for b in blocks]
    grads = torch.autograd.grad(blocks, (image, text), [u.to(b.dtype) for u, b in zip(upstream, blocks)])
    x64, t64 = image.detach().double().requires_grad_(), text.detach().double().requires_grad_()
    ref = kernel_covariance_reference(x64, t64, covariance, None if w is None else w.double())
    ref_grads = torch.autograd.grad(ref, (x64, t64), upstream)
    for name, got, want in zip(("C_tt", "C_tx", "C_xx"), blocks, ref):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_to_reference(got, want, dtype, "output", name)
    for name, got, want in zip(("dimage", "dtext"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, dtype, "grad", name)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if torch.float64 in backends.DTYPES[b]])
def test_gradcheck_float64(backend, covariance):
    image, text, omegas = _inputs(9, 4, 3, torch.float64, seed=1)
    w = omegas if covariance == "rff" else None
    with clipfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, t: kernel_covariance(x, t, covariance, w), (image, text))


def test_traces_and_rff_identity():
    """Structure the definitions imply: trace 1 for both cosine forms and RFF (||phi|| = 1)."""
    image, text, omegas = _inputs(500, 16, 40, torch.float64, seed=2)
    for covariance in COVARIANCES:
        c_tt, _, c_xx = kernel_covariance(image, text, covariance, omegas if covariance == "rff" else None)
        assert abs(torch.trace(c_tt).item() - 1) < 1e-12 and abs(torch.trace(c_xx).item() - 1) < 1e-12


def test_compile_fullgraph():
    image, text, omegas = _inputs(64, 8, 6, torch.float32, seed=3)

    def fn(x, t):
        c_tt, c_tx, c_xx = kernel_covariance(x, t, "rff", omegas)
        return (c_tx * c_tx).sum() + torch.trace(c_tt @ c_xx)

    assert torch._dynamo.explain(fn)(image, text).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(fn(image, text), (image, text))
    got = torch.autograd.grad(compiled(image, text), (image, text))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    image, text, omegas = _inputs(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="covariance"):
        kernel_covariance(image, text, "gaussian")
    with pytest.raises(RuntimeError, match="rows"):
        kernel_covariance(image, text[:5], "row_cosine")
    with pytest.raises(RuntimeError, match="omegas"):
        kernel_covariance(image, text, "rff", torch.randn(5, 3))
    with pytest.raises(ValueError, match="covariance"):
        schur_covariance_gram(image, text, "cosine", None)
