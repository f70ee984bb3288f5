"""Token keep on a GPU: Triton (default) and the opt-in CUDA kernels against the reference run on the CPU,
through the registered ops. Indices exactly (A-CLIP's 14 x 14 grid keeping 100 of 196, block 1 and 2, tied
scores with NaN and signed zeros, strided scores, rows long enough to need more shared memory than the
default); the gather's prefix and kept rows bitwise (copies), its fused token to a tolerance (another
summation order); grad_tokens bitwise (copies and one rounded product per element), grad_weights to a
tolerance; fp32 and bf16 tokens. Runs in `make gpu-check`; skips elsewhere."""

import os

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.token_keep import (token_keep_gather_backward_reference, token_keep_gather_reference,
                                           token_keep_index_reference)
from clipfast.testing import assert_close_relative

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in make gpu-check)"),
]

GPU_BACKENDS = [b for b in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(",")
                if torch.cuda.is_available()
                and backends.refusal_reason("token_keep", b, torch.device("cuda")) is None]

GRID = 14  # ViT-B/16 at 224 px: 14 x 14 patches
LENGTH = GRID * GRID
NUM_KEEP = 100  # A-CLIP: 25 blocks of 2 x 2
# Fused row against the float64 reference: fp32 accumulation, then one rounding to the tokens' dtype.
FUSED_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def _ops(backend):
    """The three registered ops, forced to ``backend``."""
    ops = torch.ops.clipfast

    def index(scores, num_keep, grid_width, block):
        with clipfast.use_backend(backend):
            return ops.token_keep_index(scores.cuda(), num_keep, grid_width, block).cpu()

    def gather(tokens, keep, weights, num_prefix):
        with clipfast.use_backend(backend):
            return ops.token_keep_gather(tokens.cuda(), keep.cuda(), None if weights is None else weights.cuda(),
                                         num_prefix).cpu()

    def backward(grad, tokens, keep, weights, num_prefix):
        with clipfast.use_backend(backend):
            grad_tokens, grad_weights = ops.token_keep_gather_backward(
                grad.cuda(), tokens.cuda(), keep.cuda(), None if weights is None else weights.cuda(), num_prefix)
        return grad_tokens.cpu(), grad_weights.cpu()

    return index, gather, backward


def _tied_scores(batch, length, seed):
    """Small integers (many exact ties, also between block sums), -0.0 next to +0.0, +-inf and NaN (a block
    holding both infinities sums to NaN)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (batch, length), generator=g).float()
    special = torch.rand(batch, length, generator=g)
    scores[(scores == 0) & (special < 0.5)] = -0.0
    scores[special > 0.97] = float("nan")
    scores[(special > 0.94) & (special <= 0.97)] = float("inf")
    scores[(special > 0.91) & (special <= 0.94)] = -float("inf")
    scores[0] = 1.0  # a row of equal scores: the lowest indices win
    return scores


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in block sums
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_index_exact(backend, block):
    index, _, _ = _ops(backend)
    g = torch.Generator().manual_seed(block)
    distinct = torch.randn(16, LENGTH, generator=g)
    strided = torch.randn(LENGTH, 16, generator=g).t()  # patch stride 16
    for scores in (distinct, _tied_scores(16, LENGTH, seed=block), strided):
        got = index(scores, NUM_KEEP, GRID, block)
        want = token_keep_index_reference(scores, NUM_KEEP, GRID, block)
        assert got.dtype == torch.int64 and torch.equal(got, want), f"block={block}:\n{got}\n!=\n{want}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("block,num_keep", [(1, 6000), (1, 1), (2, 4000), (4, 2048)])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_index_long_rows_exact(backend, block, num_keep):
    """96 x 128 patches: more candidates than threads per block, and (block 1) more scores than fit the
    default 48 KiB of shared memory per block."""
    index, _, _ = _ops(backend)
    scores = _tied_scores(3, 96 * 128, seed=7)
    got = index(scores, num_keep, 128, block)
    assert torch.equal(got, token_keep_index_reference(scores, num_keep, 128, block))


def _inputs(dtype, fuse, batch=4, num_prefix=1, dim=768, length=LENGTH, num_keep=NUM_KEEP, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, num_prefix + length, dim, generator=g).to(dtype)
    keep = token_keep_index_reference(torch.randn(batch, length, generator=g), num_keep)
    weights = torch.softmax(torch.randn(batch, length, generator=g), dim=1) if fuse else None
    grad = torch.randn(batch, num_prefix + num_keep + int(fuse), dim, generator=g).to(dtype)
    return tokens, keep, weights, grad


def _with_layout(tokens, layout):
    """The same values in another memory layout, built where ``tokens`` lives (moving a tensor with gaps
    between devices would make it contiguous)."""
    dim = tokens.shape[2]
    if layout in ("row_slice", "misaligned"):  # rows of a wider buffer: row stride dim + 64
        offset = 0 if layout == "row_slice" else 2
        wide = torch.zeros(*tokens.shape[:2], dim + 64, dtype=tokens.dtype, device=tokens.device)
        wide[..., offset:offset + dim] = tokens
        return wide[..., offset:offset + dim]
    if layout == "feature_strided":
        return torch.stack([tokens, tokens], dim=-1).flatten(-2)[..., ::2]
    return tokens


def _check(backend, tokens, keep, weights, grad, num_prefix, layout="contiguous"):
    """Forward and backward of ``backend`` on CUDA (tokens in ``layout``) against the reference on the CPU
    (in float64 for the sums)."""
    _, gather, backward = _ops(backend)
    dtype = tokens.dtype
    rows = num_prefix + keep.shape[1]
    device_tokens = _with_layout(tokens.cuda(), layout)
    assert layout in ("contiguous", "odd_dim") or not device_tokens.is_contiguous()
    kept = gather(device_tokens, keep, weights, num_prefix)
    want = token_keep_gather_reference(tokens, keep, weights, num_prefix)
    assert kept.shape == want.shape and kept.dtype == dtype and kept.is_contiguous()
    assert torch.equal(kept[:, :rows], want[:, :rows]), "prefix / kept rows are not exact copies"
    if weights is not None:
        fused64 = token_keep_gather_reference(tokens.double(), keep, weights.double(), num_prefix)[:, rows:]
        assert_close_relative(kept[:, rows:], fused64, rtol=FUSED_RTOL[dtype], atol_rel=1e-5)

    if weights is None:
        # Autograd's stand-in: one NaN expanded (stride 0) to the tokens' shape; any read of it would show.
        device_tokens = torch.full((), float("nan"), dtype=dtype, device="cuda").expand(tokens.shape)
        tokens = torch.full((), float("nan"), dtype=dtype).expand(tokens.shape)
    grad_tokens, grad_weights = backward(grad, device_tokens, keep, weights, num_prefix)
    want_tokens, _ = token_keep_gather_backward_reference(grad, tokens, keep, weights, num_prefix)
    assert grad_tokens.shape == tokens.shape and grad_tokens.dtype == dtype and grad_tokens.is_contiguous()
    assert torch.equal(grad_tokens, want_tokens), "grad_tokens differs"
    assert grad_weights.dtype == torch.float32
    if weights is None:
        assert grad_weights.shape == (tokens.shape[0], 0)
        return
    _, weights64 = token_keep_gather_backward_reference(grad.double(), tokens.double(), keep, weights.double(),
                                                        num_prefix)
    assert_close_relative(grad_weights, weights64, rtol=1e-5, atol_rel=1e-5)
    is_kept = torch.zeros_like(grad_weights, dtype=torch.bool).scatter(1, keep, True)
    assert (grad_weights[is_kept] == 0).all()


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gather_and_backward(backend, fuse, dtype, num_prefix):
    tokens, keep, weights, grad = _inputs(dtype, fuse, num_prefix=num_prefix)
    _check(backend, tokens, keep, weights, grad, num_prefix)


@pytest.mark.parametrize("layout", ["row_slice", "misaligned", "odd_dim", "feature_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gather_and_backward_strided_tokens(backend, fuse, dtype, layout):
    """Rows of a wider buffer (row stride != D) starting 16-byte aligned or not, a D of 100 (no multiple of
    16 bytes in bf16: the element-wise path), and a feature stride of 2 (copied first)."""
    tokens, keep, weights, grad = _inputs(dtype, fuse, dim=100 if layout == "odd_dim" else 256, seed=1)
    _check(backend, tokens, keep, weights, grad, 1, layout)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gather_long_rows(backend, fuse):
    """16384 patches: the patch -> position map needs more than the default 48 KiB of shared memory."""
    tokens, keep, weights, grad = _inputs(torch.float32, fuse, batch=2, dim=64, length=16384, num_keep=5000)
    _check(backend, tokens, keep, weights, grad, 1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gather_extremes(backend):
    """Keep every patch (the fused row is zero), keep none, and out-of-range indices (zero rows, no access
    outside the tensors)."""
    _, gather, _ = _ops(backend)
    tokens, keep, weights, grad = _inputs(torch.float32, True, length=12, num_keep=12, dim=32)
    _check(backend, tokens, keep, weights, grad, 1)
    _check(backend, tokens, keep[:, :0], weights, grad[:, [0, -1]], 1)
    bad = torch.tensor([[2, 12], [-1, 5], [0, 1], [3, 4]])
    out = gather(tokens, bad, None, 1)
    assert torch.equal(out[0, 1], tokens[0, 3]) and torch.equal(out[1, 2], tokens[1, 6])
    assert (out[0, 2] == 0).all() and (out[1, 1] == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_batch(backend):
    index, gather, backward = _ops(backend)
    assert index(torch.randn(0, LENGTH), NUM_KEEP, GRID, 2).shape == (0, NUM_KEEP)
    tokens, keep = torch.randn(0, 1 + LENGTH, 8), torch.zeros(0, NUM_KEEP, dtype=torch.long)
    assert gather(tokens, keep, None, 1).shape == (0, 1 + NUM_KEEP, 8)
    grad_tokens, grad_weights = backward(torch.randn(0, 1 + NUM_KEEP, 8), tokens, keep, None, 1)
    assert grad_tokens.shape == tokens.shape and grad_weights.shape == (0, 0)
