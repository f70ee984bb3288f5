"""Attentive token removal (``clipfast.attentive_token_keep``) through every backend that runs here.

Indices must equal the reference exactly (tie-free scores, and pinned ties, which follow one total
order); the kept rows are copies, so they must be bitwise equal; the fused token and the gradients are
sums and are compared with tolerances (float64 against float64, 16-bit against the fp32 computation).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast import backends
from clipfast.reference.token_keep import (token_keep_gather_backward_reference, token_keep_gather_reference,
                                           token_keep_index_reference)

CPU_BACKENDS = backends.available_backends("token_keep", "cpu")


def _tokens(batch, length, dim, dtype=torch.float32, seed=0, prefix=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prefix + length, dim, generator=g, dtype=torch.float64).to(dtype)


def _scores(batch, length, seed=1, dtype=torch.float32):
    # a random permutation of distinct values: no ties in any dtype
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g) for _ in range(batch)]).to(dtype) / length


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,length,num_keep", [(4, 196, 98), (3, 7, 1), (3, 7, 7), (2, 50, 17)])
def test_index_equals_reference(backend, batch, length, num_keep):
    scores = torch.randn(batch, length, generator=torch.Generator().manual_seed(length))
    with clipfast.use_backend(backend):
        _, index = clipfast.attentive_token_keep(_tokens(batch, length, 4), scores, num_keep)
    assert torch.equal(index, token_keep_index_reference(scores, num_keep))
    assert torch.equal(index, torch.topk(scores, num_keep).indices.sort(1).values)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pinned_tie_break(backend):
    """Equal scores go to the lower index, -0.0 equals +0.0, +-inf are ordered values; inside the index
    op (whose order is total) NaN ranks above every number."""
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 0.0],
                           [0.0, -0.0, 0.0, -1.0, -0.0, 5.0],
                           [-float("inf"), 1.0, float("inf"), -float("inf"), 3.0, 1.0]])
    nan_row = torch.tensor([[float("nan"), 1.0, float("inf"), float("nan"), 3.0, 1.0]])
    with clipfast.use_backend(backend):
        _, index = clipfast.attentive_token_keep(_tokens(3, 6, 2), scores, 3)
        nan_index = torch.ops.clipfast.token_keep_index(nan_row, 3, 0, 1)
    assert index.tolist() == [[1, 2, 4], [0, 1, 5], [1, 2, 4]]
    assert nan_index.tolist() == [[0, 2, 3]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_scores_raise(backend):
    """A selection cannot carry a NaN: the public op raises (clipfast.inputs.NON_FINITE_RULE); NaN in the
    tokens propagates into the kept rows and the fused token."""
    scores = torch.rand(2, 6)
    scores[1, 4] = float("nan")
    with clipfast.use_backend(backend), pytest.raises(ValueError, match="scores contains NaN"):
        clipfast.attentive_token_keep(_tokens(2, 6, 2), scores, 3)
    tokens = _tokens(2, 6, 2)
    tokens[0, 1 + 5, 0] = float("nan")  # a dropped patch (lowest score) and a kept one
    scores = torch.arange(12.0).reshape(2, 6)
    scores[0, 5] = -1.0
    tokens[1, 1 + 5, 1] = float("nan")
    with clipfast.use_backend(backend):
        kept, _ = clipfast.attentive_token_keep(tokens, scores, 3, fuse_dropped=True)
    assert kept[0, -1].isnan().any() and not kept[0, :-1].isnan().any()
    assert kept[1, :-1].isnan().any()


def test_nan_scores_raise_under_compile():
    fn = torch.compile(lambda t, s: clipfast.attentive_token_keep(t, s, 2)[0], backend="aot_eager", fullgraph=True)
    scores = torch.rand(1, 4)
    assert fn(_tokens(1, 4, 2), scores).shape == (1, 3, 2)
    scores[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="scores contains NaN"):
        fn(_tokens(1, 4, 2), scores)


def test_native_kernels_assert_their_invariants():
    """clipfast.attentive_token_keep validates user input; the native kernels assert the shapes they index by."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"native CPU kernels unavailable: {backends.native_load_error}")
    with pytest.raises(RuntimeError, match=r"(?s)INTERNAL ASSERT FAILED.*num_keep 7 outside \[1, 6\]"):
        torch.ops.clipfast_C.token_keep_index(torch.rand(2, 6), 7, 0, 1)
    with pytest.raises(RuntimeError, match=r"(?s)INTERNAL ASSERT FAILED.*keep_index must be \(2, K <= 6\)"):
        torch.ops.clipfast_C.token_keep_gather(_tokens(2, 6, 4), torch.zeros(3, 2, dtype=torch.long), None, 1)


def test_integer_like_arguments():
    tokens, scores = _tokens(2, 16, 3), torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    want, want_index = clipfast.attentive_token_keep(tokens, scores, 8, grid=(4, 4), block=2)
    for num_keep, grid, block, prefix in ((np.int64(8), (np.int64(4), np.int32(4)), np.int64(2), np.int64(1)),
                                          (torch.tensor(8), (torch.tensor(4), 4), torch.tensor(2), torch.tensor(1))):
        kept, index = clipfast.attentive_token_keep(tokens, scores, num_keep, grid=grid, block=block,
                                                    num_prefix_tokens=prefix)
        assert torch.equal(kept, want) and torch.equal(index, want_index)
    assert clipfast.num_keep_for_ratio(np.int64(196), np.float32(0.5), block=np.int64(2)) == 100
    _, index = clipfast.attentive_token_keep(tokens, scores, np.float64(0.5))
    assert index.shape == (2, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_mode_is_aclip_selection(backend):
    """A-CLIP: 14x14 scores, bilinear to 7x7 (the 2x2 block means), the int(49 * 0.5) + 1 = 25 best blocks."""
    batch = 4
    scores = torch.rand(batch, 196, generator=torch.Generator().manual_seed(3))
    num_keep = clipfast.num_keep_for_ratio(196, 0.5, block=2)
    assert num_keep == 100
    with clipfast.use_backend(backend):
        kept, index = clipfast.attentive_token_keep(_tokens(batch, 196, 8), scores, num_keep, grid=(14, 14), block=2)
    blocks = F.interpolate(scores.reshape(batch, 1, 14, 14), scale_factor=0.5, mode="bilinear",
                           align_corners=False).flatten(1)
    best = torch.argsort(blocks, dim=1, descending=True)[:, :25]
    mask = torch.zeros(batch, 49).scatter_(1, best, 1.0).reshape(batch, 1, 7, 7)
    want = torch.nonzero(F.interpolate(mask, scale_factor=2.0).flatten(1))[:, 1].reshape(batch, 100)
    assert torch.equal(index, want)
    assert torch.equal(index, token_keep_index_reference(scores, 100, 14, 2))
    assert kept.shape == (batch, 101, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_mode_rectangular_grid_and_block_three(backend):
    scores = torch.randn(2, 6 * 9, generator=torch.Generator().manual_seed(4))
    with clipfast.use_backend(backend):
        _, index = clipfast.attentive_token_keep(_tokens(2, 54, 4), scores, 18, grid=(6, 9), block=3)
    assert torch.equal(index, token_keep_index_reference(scores, 18, 9, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_gather_is_an_exact_copy(backend, dtype, prefix):
    if dtype not in backends.DTYPES[backend]:
        pytest.skip(f"{backend} does not compute {dtype}")
    tokens, scores = _tokens(3, 20, 16, dtype, prefix=prefix), _scores(3, 20)
    with clipfast.use_backend(backend):
        kept, index = clipfast.attentive_token_keep(tokens, scores, 9, num_prefix_tokens=prefix)
    assert kept.dtype == dtype and kept.shape == (3, prefix + 9, 16)
    assert torch.equal(kept, token_keep_gather_reference(tokens, index, None, prefix))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_token_and_gradients(backend, dtype):
    if dtype not in backends.DTYPES[backend]:
        pytest.skip(f"{backend} does not compute {dtype}")
    tokens = _tokens(3, 30, 24, dtype).requires_grad_()
    scores = _scores(3, 30).softmax(-1).to(dtype).requires_grad_()
    grad = _tokens(3, 12, 24, dtype, seed=9, prefix=0)
    with clipfast.use_backend(backend):
        kept, index = clipfast.attentive_token_keep(tokens, scores, 10, fuse_dropped=True)
        kept.backward(grad)
    # float64 ground truth from the plain formula
    t64, s64 = tokens.detach().double().requires_grad_(), scores.detach().double().requires_grad_()
    dropped = torch.ones(3, 30, dtype=torch.bool).scatter_(1, index, False)
    fused = (s64 * dropped).unsqueeze(-1).mul(t64[:, 1:]).sum(1, keepdim=True)
    want = torch.cat([t64[:, :1], torch.gather(t64[:, 1:], 1, index.unsqueeze(-1).expand(-1, -1, 24)), fused], 1)
    want.backward(grad.double())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kept.double(), want.detach(), **tol)
    torch.testing.assert_close(tokens.grad.double(), t64.grad, **tol)
    torch.testing.assert_close(scores.grad.double(), s64.grad, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_a_row_scatter(backend):
    tokens = _tokens(2, 12, 5).requires_grad_()
    with clipfast.use_backend(backend):
        kept, index = clipfast.attentive_token_keep(tokens, _scores(2, 12), 4)
    grad = torch.randn_like(kept)
    kept.backward(grad)
    want = torch.zeros_like(tokens)
    want[:, :1] = grad[:, :1]
    want[:, 1:].scatter_(1, index.unsqueeze(-1).expand(-1, -1, 5), grad[:, 1:])
    assert torch.equal(tokens.grad, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_ops_equal_reference(backend):
    tokens, index = _tokens(3, 16, 8), token_keep_index_reference(_scores(3, 16), 6)
    weights = _scores(3, 16, seed=5)
    from clipfast.ops.token_keep import KERNELS

    for fuse in (None, weights):
        grad = torch.randn(3, 1 + 6 + (fuse is not None), 8)
        got = KERNELS.kernels(backend).gather_backward(grad, tokens, index, fuse, 1)
        want = token_keep_gather_backward_reference(grad, tokens, index, fuse, 1)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    if torch.float64 not in backends.DTYPES[backend]:
        pytest.skip(f"{backend} does not compute float64")
    tokens = _tokens(2, 9, 3, torch.float64).requires_grad_()
    scores = _scores(2, 9, dtype=torch.float64).requires_grad_()
    with clipfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t, s: clipfast.attentive_token_keep(t, s, 4, fuse_dropped=True)[0],
                                        (tokens, scores))
        assert torch.autograd.gradcheck(lambda t: clipfast.attentive_token_keep(t, scores, 4, num_prefix_tokens=1)[0],
                                        (tokens,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_empty_inputs(backend):
    base = _tokens(3, 20, 32)
    tokens = base[:, :, ::2]  # strided rows
    scores = _scores(20, 3).t()  # transposed
    with clipfast.use_backend(backend):
        kept, index = clipfast.attentive_token_keep(tokens, scores, 5)
        empty, empty_index = clipfast.attentive_token_keep(base[:0], scores[:0], 5)
    assert torch.equal(index, token_keep_index_reference(scores.contiguous(), 5))
    assert torch.equal(kept, token_keep_gather_reference(tokens.contiguous(), index, None, 1))
    assert empty.shape == (0, 6, 32) and empty_index.shape == (0, 5)


def test_float64_scores_rank_in_float32_for_float32_tokens():
    """The documented rule: scores are compared in the tokens' computation dtype."""
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    _, index32 = clipfast.attentive_token_keep(_tokens(1, 3, 2), scores, 1)
    _, index64 = clipfast.attentive_token_keep(_tokens(1, 3, 2, torch.float64), scores, 1)
    assert index32.tolist() == [[0]] and index64.tolist() == [[1]]


def test_num_keep_for_ratio_rules():
    assert clipfast.num_keep_for_ratio(196, 0.7) == math.ceil(0.7 * 196) == 138  # EViT
    assert clipfast.num_keep_for_ratio(196, 0.5, block=2) == 100  # A-CLIP: 25 of 49 blocks
    assert clipfast.num_keep_for_ratio(196, 1.0, block=2) == 196
    assert clipfast.num_keep_for_ratio(10, 0.01) == 1
    _, index = clipfast.attentive_token_keep(_tokens(2, 196, 4), _scores(2, 196), 0.5, grid=(14, 14), block=2)
    assert index.shape == (2, 100)


def test_compile_fullgraph():
    tokens = _tokens(2, 16, 8).requires_grad_()
    scores = _scores(2, 16).requires_grad_()

    def fn(t, s):
        kept, _ = clipfast.attentive_token_keep(t, s, 0.5, grid=(4, 4), block=2, fuse_dropped=True)
        return kept.square().sum()

    explanation = torch._dynamo.explain(fn)(tokens, scores)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(tokens, scores), (tokens, scores))
    want = torch.autograd.grad(fn(tokens, scores), (tokens, scores))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


BAD = [
    (dict(num_keep=0), ValueError, "num_keep"),
    (dict(num_keep=17), ValueError, "num_keep"),
    (dict(num_keep=2.0), ValueError, "keep_ratio"),
    (dict(num_keep=True), ValueError, "num_keep"),
    (dict(scores=torch.zeros(2, 15)), ValueError, "scores must have shape"),
    (dict(scores=torch.zeros(3, 16)), ValueError, "scores must have shape"),
    (dict(scores=torch.zeros(2, 16, dtype=torch.int64)), TypeError, "scores must be float"),
    (dict(tokens=torch.zeros(2, 17, 4, dtype=torch.int32)), TypeError, "tokens must be float"),
    (dict(tokens=torch.zeros(2, 17)), ValueError, "tokens must be 3-D"),
    (dict(grid=(4, 5), block=2), ValueError, "grid must be"),
    (dict(grid=(2, 8), block=4), ValueError, "not divisible"),
    (dict(block=2), ValueError, "needs grid"),
    (dict(grid=(4, 4), block=2, num_keep=6), ValueError, "multiple of block"),
    (dict(num_prefix_tokens=17), ValueError, "num_prefix_tokens"),
    (dict(block=0), ValueError, "block must be"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_inputs(kwargs, error, match):
    args = dict(tokens=torch.zeros(2, 17, 4), scores=torch.zeros(2, 16), num_keep=8)
    args.update(kwargs)
    tokens, scores, num_keep = args.pop("tokens"), args.pop("scores"), args.pop("num_keep")
    with pytest.raises(error, match=match):
        clipfast.attentive_token_keep(tokens, scores, num_keep, **args)
