"""The kernel-covariance core of the Schur-complement op through every backend that runs here, against
the float64 reference; gradients, compile, bad input."""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.ops.schur_covariance import feature_gram, kernel_covariance
from clipfast.reference.schur_covariance import kernel_covariance_reference
from clipfast.testing import assert_close_to_reference

CPU_BACKENDS = backends.available_backends("schur_covariance", "cpu")
MAPS = ["column_cosine", "row_cosine", "rff"]
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
    return (text.to(dtype).requires_grad_(), image.to(dtype).requires_grad_(), omegas.to(dtype))


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_matches_float64_reference(backend, shape, dtype, feature_map):
    n, d, m = shape
    text, image, omegas = _inputs(n, d, m, dtype)
    w = omegas if feature_map == "rff" else None
    with clipfast.use_backend(backend):
        blocks = kernel_covariance(text, image, feature_map, w)
    upstream = [torch.randn(b.shape, dtype=torch.float64) for b in blocks]
    grads = torch.autograd.grad(blocks, (text, image), [u.to(b.dtype) for u, b in zip(upstream, blocks)])
    t64, x64 = text.detach().double().requires_grad_(), image.detach().double().requires_grad_()
    ref = kernel_covariance_reference(t64, x64, feature_map, None if w is None else w.double())
    ref_grads = torch.autograd.grad(ref, (t64, x64), upstream)
    for name, got, want in zip(("C_tt", "C_tx", "C_xx"), blocks, ref):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_to_reference(got, want, dtype, "output", name)
    for name, got, want in zip(("dtext", "dimage"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, dtype, "grad", name)


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if torch.float64 in backends.DTYPES[b]])
def test_gradcheck_float64(backend, feature_map):
    text, image, omegas = _inputs(9, 4, 3, torch.float64, seed=1)
    w = omegas if feature_map == "rff" else None
    with clipfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t, x: kernel_covariance(t, x, feature_map, w), (text, image))


def test_traces_and_rff_identity():
    """Structure the definitions imply: trace 1 for both cosine forms and RFF (||phi|| = 1)."""
    text, image, omegas = _inputs(500, 16, 40, torch.float64, seed=2)
    for feature_map in MAPS:
        c_tt, _, c_xx = kernel_covariance(text, image, feature_map, omegas if feature_map == "rff" else None)
        assert abs(torch.trace(c_tt).item() - 1) < 1e-12 and abs(torch.trace(c_xx).item() - 1) < 1e-12


def test_compile_fullgraph():
    text, image, omegas = _inputs(64, 8, 6, torch.float32, seed=3)

    def fn(t, x):
        c_tt, c_tx, c_xx = kernel_covariance(t, x, "rff", omegas)
        return (c_tx * c_tx).sum() + torch.trace(c_tt @ c_xx)

    assert torch._dynamo.explain(fn)(text, image).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(fn(text, image), (text, image))
    got = torch.autograd.grad(compiled(text, image), (text, image))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    text, image, omegas = _inputs(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="feature_map"):
        kernel_covariance(text, image, "gaussian")
    with pytest.raises(RuntimeError, match="rows"):
        kernel_covariance(text, image[:5], "row_cosine")
    with pytest.raises(RuntimeError, match="omegas"):
        kernel_covariance(text, image, "rff", torch.randn(5, 3))
    with pytest.raises(ValueError, match="feature_map"):
        feature_gram(text, image, "cosine", None)
