"""Token merging (``clipfast.token_merge``, ToMe) through every backend that runs here.

The reference is checked against a plain-PyTorch port of ToMe's published procedure
(:mod:`clipfast.testing.tome`); every backend's matching must equal the reference's exactly on inputs with a
margin (each A token's best partner and the ranking of the best scores separated by far more than rounding),
and its merged tokens and gradients must match the float64 reference within the tolerance table.
"""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.token_merge import (merge_count, token_merge_match_reference,
                                            token_merge_reduce_backward_reference, token_merge_reduce_reference)
from clipfast.testing import TOLERANCES
from clipfast.testing.tome import margin_metric, parse_r, tome_merge

CPU_BACKENDS = backends.available_backends("token_merge", "cpu")


def _tokens(batch, n, dim, seed=1, dtype=torch.float32):
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _sizes(batch, n, seed=2):
    return 1.0 + torch.randint(0, 4, (batch, n), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("with_size", [False, True])
def test_reference_equals_tome_port(num_prefix, with_size):
    """The specification is ToMe's bipartite_soft_matching + merge_wavg (class and distillation tokens)."""
    x, metric = _tokens(3, 197, 32, dtype=torch.float64), torch.randn(3, 197, 16, dtype=torch.float64)
    size = _sizes(3, 197) if with_size else None
    for r in (16, 98, 0):
        want, want_size = tome_merge(x, metric, r, size, num_prefix)
        dest = token_merge_match_reference(metric, r, num_prefix)
        got, got_size = token_merge_reduce_reference(x, dest, size, 197 - merge_count(197, r, num_prefix))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,num_prefix,r", [(197, 1, 16), (197, 2, 40), (50, 0, 7), (11, 1, 100), (64, 3, 5)])
def test_match_equals_reference(backend, n, num_prefix, r):
    metric = margin_metric(3, n, num_prefix=num_prefix)
    want = token_merge_match_reference(metric.double(), r, num_prefix)
    with clipfast.use_backend(backend):
        dest = torch.ops.clipfast.token_merge_match(metric, r, num_prefix)
    assert torch.equal(dest, want)
    merged = merge_count(n, r, num_prefix)
    assert dest.min() >= 0 and dest.max() == n - merged - 1
    assert (torch.stack([d.bincount(minlength=n - merged) for d in dest]) > 0).all()  # every row has a source
    assert torch.equal(dest[:, :num_prefix], torch.arange(num_prefix).expand(3, -1))  # the prefix stays first


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_size", [False, True])
def test_merge_and_gradient_close_to_float64_reference(backend, dtype, with_size):
    if dtype not in backends.DTYPES[backend]:
        pytest.skip(f"the {backend} backend does not compute {dtype}")
    metric = margin_metric(2, 197)
    x = _tokens(2, 197, 48, dtype=dtype).requires_grad_()
    size = _sizes(2, 197) if with_size else None
    grad = _tokens(2, 181, 48, seed=5, dtype=dtype)
    with clipfast.use_backend(backend):
        merged, merged_size, dest = clipfast.token_merge(x, metric, 16, size=None if size is None else size.to(dtype))
        merged.backward(grad)
    x64 = x.detach().double().requires_grad_()
    want, want_size = token_merge_reduce_reference(x64, dest, size, 181)
    want.backward(grad.double())
    rtol, atol = TOLERANCES[dtype]["output"]
    torch.testing.assert_close(merged.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(merged_size.double(), want_size, rtol=0, atol=0)
    rtol, atol = TOLERANCES[dtype]["grad"]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), token_merge_reduce_backward_reference(grad.double(), dest, size,
                                                                                      want_size), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tokens(backend, dtype):
    """16-bit tokens accumulate in fp32: the merged tokens are the fp32 result rounded once (within one
    16-bit rounding step: a backend may fuse the multiply-add, moving the fp32 sum by one fp32 ulp)."""
    metric = margin_metric(2, 197, dtype=dtype)
    x = _tokens(2, 197, 64, dtype=dtype)
    with clipfast.use_backend(backend):
        merged, merged_size, dest = clipfast.token_merge(x, metric, 16)
    assert merged.dtype == dtype and merged_size.dtype == torch.float32
    assert torch.equal(dest, token_merge_match_reference(metric.double(), 16, 1))
    want, _ = token_merge_reduce_reference(x.float(), dest, None, 181)
    torch.testing.assert_close(merged.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_merge_keeps_every_token_in_place(backend):
    """r' = 0 (r = 0, or too few tokens): dest is the identity and each token its own mean."""
    x, metric = _tokens(2, 9, 8), torch.randn(2, 9, 4)
    with clipfast.use_backend(backend):
        for r, num_prefix in ((0, 1), (5, 8)):
            merged, merged_size, dest = clipfast.token_merge(x, metric, r, num_prefix_tokens=num_prefix)
            assert torch.equal(dest, torch.arange(9).expand(2, 9)) and torch.equal(merged, x)
            assert torch.equal(merged_size, torch.ones(2, 9))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    """Duplicate B tokens tie as partners (the lower B wins); equal best scores rank the lower A first."""
    b_tokens = torch.eye(4)[[0, 0, 1, 2]]  # B0 == B1
    metric = torch.empty(1, 8, 4)
    metric[0, 1::2] = b_tokens
    metric[0, 0::2] = torch.eye(4)[[0, 1, 0, 3]]  # A0 and A2 tie (cosine 1 with B0 and B1)
    with clipfast.use_backend(backend):
        dest = torch.ops.clipfast.token_merge_match(metric, 1, 0)
    assert torch.equal(dest, token_merge_match_reference(metric, 1, 0))
    # A0, A1 and A2 tie at cosine 1: A0 ranks first and merges into B0 (the lower of B0 and B1), which sits
    # behind the 3 kept A tokens (row 3); A1 and A2 follow in index order (rows 0 and 1).
    assert dest[0].tolist() == [3, 3, 0, 4, 1, 5, 2, 6]


def test_schedule_port():
    """ToMe's schedules: constant, (r, inflection) ramps and padded lists."""
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(5, (8, 0.5)) == [4, 6, 8, 10, 12]
    assert parse_r(3, [1, 2]) == [1, 2, 0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    if torch.float64 not in backends.DTYPES[backend]:
        pytest.skip(f"the {backend} backend does not compute float64")
    x = _tokens(2, 13, 5, dtype=torch.float64).requires_grad_()
    metric, size = torch.randn(2, 13, 3, dtype=torch.float64), _sizes(2, 13)
    with clipfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: clipfast.token_merge(t, metric, 4, size=size)[0], (x,))


def test_compiles_without_graph_breaks():
    x, metric, size = _tokens(2, 21, 8).requires_grad_(), torch.randn(2, 21, 4), _sizes(2, 21).float()

    def step(t):
        merged, merged_size, _ = clipfast.token_merge(t, metric, 5, size=size)
        return (merged * merged_size[..., None]).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got, x)
    want = step(x)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("bad, error, match", [
    (dict(r=-1), ValueError, "r must be"),
    (dict(num_prefix_tokens=22), ValueError, "num_prefix_tokens"),
    (dict(metric=torch.randn(2, 20, 4)), ValueError, "same batch and tokens"),
    (dict(metric=torch.randn(2, 21, 4).long()), TypeError, "metric must be float"),
    (dict(size=torch.ones(2, 20)), ValueError, "size must be a float tensor"),
    (dict(size=torch.zeros(2, 21)), ValueError, "positive"),
    (dict(size=torch.full((2, 21), float("nan"))), ValueError, "NaN or Inf"),
    (dict(metric=torch.full((2, 21, 4), float("inf"))), ValueError, "NaN or Inf"),
])
def test_bad_input_raises(bad, error, match):
    args = dict(x=torch.randn(2, 21, 8), metric=torch.randn(2, 21, 4), r=3) | bad
    with pytest.raises(error, match=match):
        clipfast.token_merge(args.pop("x"), args.pop("metric"), args.pop("r"), **args)


def test_cpu_kernel_rejects_a_dest_out_of_range():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the native CPU kernels are not built")
    x, dest = torch.randn(1, 4, 2), torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.clipfast_C.token_merge_reduce(x, dest, None, 3)
    with pytest.raises(ValueError, match="no source"):
        torch.ops.clipfast_C.token_merge_reduce(x, torch.tensor([[0, 0, 2, 2]]), None, 3)
