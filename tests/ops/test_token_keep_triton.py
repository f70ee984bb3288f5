"""Triton token_keep kernels against the reference (clipfast.reference.token_keep).

* Selection: index for index equal to the reference, block 1 and block b > 1 (A-CLIP's 14 x 14 grid
  keeping 100 of 196 patches, a 24 x 24 grid with several patch tiles per row, 3 x 3 blocks), odd L, exact
  ties (integer-valued scores, equal block sums), NaN (above +inf, ties among NaNs to the lower index),
  -0.0 == +0.0, float64 scores, non-contiguous scores.
* Gather: the prefix and kept rows are copies (bitwise equal); the fused row matches the reference to a
  tolerance of a few rounding errors of the accumulation dtype (the summation orders differ), then one
  rounding to the tokens' dtype.
* Backward: grad_tokens is bitwise equal (copies, and ``w_i * grad_fused`` rounded once, as the reference);
  grad_weights (dot products over D) to a tolerance. Without fusion the tokens may be a stride-0 stand-in.
* fp32 / bf16 / fp16 (and fp64) tokens, P in {0, 1, 2}, non-contiguous inputs, B = 0, determinism and
  argument validation.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is unavailable), so shapes are small.
"""

import pytest
import torch

try:
    import triton
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.reference.token_keep import (token_keep_gather_backward_reference, token_keep_gather_reference,
                                           token_keep_index_reference)
from clipfast.triton_kernels import token_keep as T

DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"
TOKEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rtol, atol per kept patch and unit |token|) of the fused row, per tokens' dtype: fp32 / fp64
# accumulation in another order, then one rounding to the tokens' dtype (one bf16 ulp under the
# interpreter, which truncates fp32 -> bf16).
FUSED_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-5),
             torch.float64: (1e-12, 1e-12)}


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _index(scores, num_keep, grid_width=0, block=1):
    (s,) = _on_device(scores)
    out = T.token_keep_index_triton(s, num_keep, grid_width, block).cpu()
    expected = token_keep_index_reference(scores, num_keep, grid_width, block)
    assert out.dtype == torch.int64 and out.shape == expected.shape
    assert torch.equal(out, expected), f"block={block} K={num_keep}:\n{out}\n!=\n{expected}"
    return out


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2])
def test_index_vit_grid(block):
    """A-CLIP / EViT shapes: 14 x 14 patches, keep 100 of 196 (25 blocks of 2 x 2 in block mode)."""
    _index(torch.randn(4, 196), 100, 14, block)
    _index(torch.rand(2, 196), 196, 14, block)  # everything kept: 0..195
    _index(torch.rand(2, 196), 4, 14, block)


@pytest.mark.parametrize("block,num_keep", [(1, 288), (1, 3), (2, 288), (3, 180)])
def test_index_several_patch_tiles(block, num_keep):
    """24 x 24 = 576 patches: the kept flags' prefix sum carries over three 256-patch tiles."""
    _index(torch.randn(2, 576), num_keep, 24, block)


@pytest.mark.parametrize("num_keep", [1, 18, 36, 37])
def test_index_odd_length(num_keep):
    _index(torch.randn(3, 37), num_keep)
    _index(torch.randn(2, 1), 1)


def test_index_ties_go_to_the_lower_index():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 4, (4, 50), generator=g).float()  # seven values: ties everywhere
    for k in (1, 7, 20, 49):
        _index(scores, k)
    assert _index(torch.ones(1, 9), 4).tolist() == [[0, 1, 2, 3]]
    # Integer patch scores on a 6 x 8 grid: many 2 x 2 and 3 x 3 block sums are equal.
    grid = torch.randint(-2, 3, (3, 48), generator=g).float()
    for k in (4, 16, 44):
        _index(grid, k, 8, 2)
    _index(torch.randint(-1, 2, (3, 36), generator=g).float(), 18, 6, 3)
    # Equal block sums from different patches: blocks 0 and 1 tie (sum 2) and block 0 wins.
    assert _index(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), 4, 4, 2).tolist() == [[0, 1, 4, 5]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_index_nan_ranks_above_inf():
    inf, nan = float("inf"), float("nan")
    s = torch.tensor([[1.0, nan, inf, -inf, nan, 2.0, -1.0, nan]])
    assert _index(s, 2).tolist() == [[1, 4]]  # NaNs first, the lower ones
    assert _index(s, 4).tolist() == [[1, 2, 4, 7]]  # then +inf
    _index(s, 6)
    mixed = torch.randn(5, 40)
    mixed[mixed > 1.0] = nan
    mixed[0] = nan  # an all-NaN row: the first K
    for k in (1, 10, 39):
        _index(mixed, k)
    # A NaN patch makes its block NaN; +inf + -inf blocks are NaN too.
    blocks = torch.randn(3, 64)
    blocks[0, 9], blocks[1, 0], blocks[1, 1], blocks[2, 27] = nan, inf, -inf, inf
    for k in (4, 12):
        _index(blocks, k, 8, 2)
    _index(blocks.double(), 12, 8, 2)


def test_index_signed_zeros_are_equal():
    z = torch.tensor([[-0.0, 0.0, -1.0, 0.0, -0.0, -2.0]])
    assert _index(z, 1).tolist() == [[0]]
    assert _index(z, 3).tolist() == [[0, 1, 3]]
    assert _index(-z, 2).tolist() == [[2, 5]]  # 1 and 2 above the zeros
    _index(z.double(), 4)
    # 2 x 4 grid, two 2 x 2 blocks (patches 0, 1, 4, 5 and 2, 3, 6, 7) summing to -0.0 and +0.0: a tie
    # that goes to block 0 whichever of the two zeros it holds.
    zeros = torch.tensor([[-0.0, -0.0, 0.0, 0.0, -0.0, -0.0, 0.0, 0.0]])
    assert _index(zeros, 4, 4, 2).tolist() == [[0, 1, 4, 5]]
    assert _index(-zeros, 4, 4, 2).tolist() == [[0, 1, 4, 5]]
    _index(-zeros.double(), 4, 4, 2)


def test_index_float64_and_strided_scores():
    s = torch.randn(3, 196, dtype=torch.float64)
    s[0, :20] = s[0, 20:40]  # exact ties in float64
    _index(s, 100, 14, 2)
    _index(s, 37)
    wide = torch.randn(196, 6)  # scores (B, L) = wide.T[::2]: strides (2, 6)
    strided = wide.t()[::2]
    assert not strided.is_contiguous()
    _index(strided, 100, 14, 2)
    _index(strided, 50)


def test_index_empty_batch():
    out = T.token_keep_index_triton(torch.randn(0, 196, device=DEVICE), 100, 14, 2)
    assert out.shape == (0, 100) and out.dtype == torch.int64


def test_index_validation():
    """User arguments are validated by clipfast.functional and the op; a direct caller that breaks the
    launcher's invariants gets a RuntimeError, never an out-of-bounds launch."""
    s = torch.randn(2, 16, device=DEVICE)
    f = T.token_keep_index_triton
    with pytest.raises(RuntimeError, match=r"scores must be a 2-D tensor .*, got \(16,\)"):
        f(s[0], 2, 4, 1)
    with pytest.raises(RuntimeError, match=r"scores must be a 2-D tensor of dtype torch.float32 or torch.float64, "
                                           r"got \(2, 16\) torch.float16"):
        f(s.half(), 2, 4, 1)
    with pytest.raises(RuntimeError, match="scores must be a 2-D tensor .*, got list"):
        f(s.tolist(), 2, 4, 1)
    for k in (0, 17):
        with pytest.raises(RuntimeError, match=rf"num_keep must be an int in \[1, 16\], got {k}"):
            f(s, k, 4, 1)
    with pytest.raises(RuntimeError, match=r"num_keep must be an int in \[1, 16\], got 2.0"):
        f(s, 2.0, 4, 1)
    with pytest.raises(RuntimeError, match=r"block must be an int >= 1, got 0"):
        f(s, 4, 4, 0)
    for width in (0, 3, 6, 16):  # W must divide L, with W and L / W multiples of the block
        with pytest.raises(RuntimeError, match=f"grid_width W dividing L = 16 .*, got grid_width={width}"):
            f(s, 4, width, 2)
    with pytest.raises(RuntimeError, match=r"num_keep must be a multiple of block\^2 = 4, got 6"):
        f(s, 6, 4, 2)


# --------------------------------------------------------------------------------------------
# Gather and its backward
# --------------------------------------------------------------------------------------------


def _keep_and_weights(batch, length, num_keep, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = token_keep_index_reference(torch.randn(batch, length, generator=g), num_keep)
    weights = torch.rand(batch, length, generator=g).to(T._weights_dtype(dtype))
    return keep, weights


def _assert_grad_tokens(actual, expected, keep, num_prefix):
    """Bitwise equal, except that the interpreter truncates fp32 -> bf16 where GPUs (and torch) round to
    nearest even: there the dropped rows ``w_i * grad_fused`` may differ by one bf16 ulp."""
    if actual.dtype != torch.bfloat16 or not triton.knobs.runtime.interpret:
        assert torch.equal(actual, expected), "grad_tokens differs"
        return
    dropped = torch.ones(actual.shape[:2], dtype=torch.bool)
    dropped[:, :num_prefix] = False
    dropped[:, num_prefix:].scatter_(1, keep, False)
    assert torch.equal(actual[~dropped], expected[~dropped]), "copied grad_tokens rows differ"
    torch.testing.assert_close(actual[dropped], expected[dropped], rtol=2**-7, atol=0)


def _check_gather(tokens, keep, weights, num_prefix, grad=None):
    """Forward and backward of the kernels against the reference; returns the kernels' outputs."""
    dtype = tokens.dtype
    rtol, atol = FUSED_TOL[dtype]
    t, k, w = _on_device(tokens, keep, weights)
    out = T.token_keep_gather_triton(t, k, w, num_prefix).cpu()
    expected = token_keep_gather_reference(tokens, keep, weights, num_prefix)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    rows = num_prefix + keep.shape[1]
    assert torch.equal(out[:, :rows], expected[:, :rows]), "prefix / kept rows are not exact copies"
    scale = tokens.abs().max().item() if tokens.numel() else 1.0
    if weights is not None:
        torch.testing.assert_close(out[:, rows:], expected[:, rows:], rtol=rtol, atol=atol * scale * keep.shape[1])

    if grad is None:
        grad = torch.randn(expected.shape, dtype=torch.float64).to(dtype)
    (gd,) = _on_device(grad)
    grad_tokens, grad_weights = T.token_keep_gather_backward_triton(gd, t, k, w, num_prefix)
    grad_tokens, grad_weights = grad_tokens.cpu(), grad_weights.cpu()
    ref_tokens, ref_weights = token_keep_gather_backward_reference(grad.contiguous(), tokens, keep, weights,
                                                                   num_prefix)
    assert grad_tokens.dtype == dtype and grad_tokens.shape == tokens.shape and grad_tokens.is_contiguous()
    _assert_grad_tokens(grad_tokens, ref_tokens, keep, num_prefix)
    assert grad_weights.dtype == T._weights_dtype(dtype)
    assert grad_weights.shape == (tokens.shape[0], 0 if weights is None else weights.shape[1])
    if weights is not None:
        gscale = scale * grad[:, -1].abs().max().item() * tokens.shape[2] if tokens.numel() else 1.0
        torch.testing.assert_close(grad_weights, ref_weights, rtol=1e-5, atol=1e-6 * gscale)
        kept = torch.zeros_like(grad_weights, dtype=torch.bool).scatter(1, keep, True)
        assert (grad_weights[kept] == 0).all()
    return out, grad_tokens, grad_weights


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_gather_matches_reference(dtype, num_prefix, fuse):
    """L = 70 patches (three 32-patch tiles of the fused row), K = 35, D = 200 (two backward column
    chunks)."""
    batch, length, num_keep, dim = 2, 70, 35, 200
    tokens = torch.randn(batch, num_prefix + length, dim).to(dtype)
    keep, weights = _keep_and_weights(batch, length, num_keep, dtype, seed=num_prefix)
    _check_gather(tokens, keep, weights if fuse else None, num_prefix)


@pytest.mark.parametrize("fuse", [False, True])
def test_gather_many_kept_and_wide_rows(fuse):
    """K = 100 (> one 64-entry keep tile), D = 300 (two gather column tiles, three backward chunks)."""
    tokens = torch.randn(2, 1 + 196, 300)
    keep, weights = _keep_and_weights(2, 196, 100, torch.float32, seed=3)
    _check_gather(tokens, keep, weights if fuse else None, 1)


@pytest.mark.parametrize("fuse", [False, True])
def test_gather_non_contiguous(fuse):
    batch, num_prefix, length, dim = 3, 1, 40, 24
    # tokens (B, P + L, D) as the transpose of a (B, D, P + L) buffer: token stride 1, feature stride P + L.
    tokens = torch.randn(batch, dim, num_prefix + length).transpose(1, 2)
    keep, weights = _keep_and_weights(batch, length, 13, torch.float32, seed=4)
    keep = keep.t().contiguous().t()  # column-major keep_index
    weights = weights.t().contiguous().t()  # column-major weights
    wide = torch.randn(batch, num_prefix + 13 + fuse, 2 * dim)
    grad = wide[..., ::2]  # feature stride 2
    assert not (tokens.is_contiguous() or keep.is_contiguous() or weights.is_contiguous() or grad.is_contiguous())
    _check_gather(tokens, keep, weights if fuse else None, num_prefix, grad=grad)
    _check_gather(tokens[:, :, ::3].to(torch.bfloat16), keep, weights if fuse else None, num_prefix)


def test_gather_float64():
    tokens = torch.randn(2, 2 + 30, 20, dtype=torch.float64)
    keep, weights = _keep_and_weights(2, 30, 11, torch.float64, seed=5)
    assert weights.dtype == torch.float64
    _check_gather(tokens, keep, weights, 2)
    _check_gather(tokens, keep, None, 2)


def test_gather_extremes():
    """Keep nothing but the prefix (K = 0), keep every patch (nothing fused: a zero row), one patch, and
    out-of-range indices."""
    tokens = torch.randn(2, 1 + 12, 8)
    keep, weights = _keep_and_weights(2, 12, 12, torch.float32)
    out, _, grad_weights = _check_gather(tokens, keep, weights, 1)
    assert (out[:, -1] == 0).all() and (grad_weights == 0).all()
    _check_gather(tokens, keep[:, :0], weights, 1)
    _check_gather(tokens, keep[:, :0], None, 0)
    _check_gather(tokens[:, :2], keep[:, :1] * 0, weights[:, :1], 1)
    # An out-of-range keep_index entry is not read (no out-of-bounds access): its row is zero.
    bad = torch.tensor([[2, 12], [-1, 5]], device=DEVICE)
    out = T.token_keep_gather_triton(tokens.to(DEVICE), bad, None, 1).cpu()
    assert torch.equal(out[0, 1], tokens[0, 3]) and torch.equal(out[1, 2], tokens[1, 6])
    assert (out[0, 2] == 0).all() and (out[1, 1] == 0).all()


def test_backward_without_fusion_does_not_need_the_tokens():
    """The autograd stand-in: a one-element tensor expanded to the tokens' shape (stride 0), here NaN so
    that any use of its value would show."""
    batch, num_prefix, length, dim = 2, 1, 20, 16
    stand_in = torch.full((), float("nan"), dtype=torch.bfloat16).expand(batch, num_prefix + length, dim)
    keep, _ = _keep_and_weights(batch, length, 9, torch.bfloat16)
    grad = torch.randn(batch, num_prefix + 9, dim).to(torch.bfloat16)
    s, k, g = _on_device(stand_in, keep, grad)
    grad_tokens, grad_weights = T.token_keep_gather_backward_triton(g, s, k, None, num_prefix)
    ref_tokens, _ = token_keep_gather_backward_reference(grad, stand_in, keep, None, num_prefix)
    assert torch.equal(grad_tokens.cpu(), ref_tokens) and not ref_tokens.isnan().any()
    assert grad_weights.shape == (batch, 0) and grad_weights.dtype == torch.float32


def test_gather_empty_batch():
    tokens = torch.randn(0, 1 + 16, 8, device=DEVICE)
    keep = torch.zeros(0, 5, dtype=torch.int64, device=DEVICE)
    weights = torch.zeros(0, 16, device=DEVICE)
    assert T.token_keep_gather_triton(tokens, keep, weights, 1).shape == (0, 7, 8)
    assert T.token_keep_gather_triton(tokens, keep, None, 1).shape == (0, 6, 8)
    grad_tokens, grad_weights = T.token_keep_gather_backward_triton(torch.zeros(0, 7, 8, device=DEVICE), tokens, keep,
                                                                    weights, 1)
    assert grad_tokens.shape == (0, 17, 8) and grad_weights.shape == (0, 16)
    grad_tokens, grad_weights = T.token_keep_gather_backward_triton(torch.zeros(0, 6, 8, device=DEVICE), tokens, keep,
                                                                    None, 1)
    assert grad_tokens.shape == (0, 17, 8) and grad_weights.shape == (0, 0)


def test_deterministic():
    tokens = torch.randn(2, 1 + 50, 40, device=DEVICE)
    keep, weights = _on_device(*_keep_and_weights(2, 50, 20, torch.float32))
    grad = torch.randn(2, 1 + 20 + 1, 40, device=DEVICE)
    first = (T.token_keep_gather_triton(tokens, keep, weights, 1),
             *T.token_keep_gather_backward_triton(grad, tokens, keep, weights, 1))
    second = (T.token_keep_gather_triton(tokens, keep, weights, 1),
              *T.token_keep_gather_backward_triton(grad, tokens, keep, weights, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gather_validation():
    tokens = torch.randn(2, 1 + 8, 4, device=DEVICE)
    keep = torch.tensor([[0, 3], [1, 2]], device=DEVICE)
    weights = torch.rand(2, 8, device=DEVICE)
    gather, backward = T.token_keep_gather_triton, T.token_keep_gather_backward_triton
    with pytest.raises(RuntimeError, match=r"tokens must be a 3-D tensor .*, got \(9, 4\)"):
        gather(tokens[0], keep, None, 1)
    with pytest.raises(RuntimeError, match=r"tokens must be a 3-D tensor of dtype .*, got \(2, 9, 4\) torch.int32"):
        gather(tokens.to(torch.int32), keep, None, 1)
    with pytest.raises(RuntimeError, match=r"keep_index must be a 2-D tensor of dtype torch.int64, "
                                           r"got \(2, 2\) torch.int32"):
        gather(tokens, keep.int(), None, 1)
    with pytest.raises(RuntimeError, match=r"keep_index must have shape \(B, K\) with B = 2 .*, got \(1, 2\)"):
        gather(tokens, keep[:1], None, 1)
    with pytest.raises(RuntimeError, match=r"keep_index must have shape \(B, K\) with B = 2 and K <= 1 patches"):
        gather(tokens[:, :2], keep, None, 1)  # K = 2 > L = 1
    for p in (-1, 10, 1.0):
        with pytest.raises(RuntimeError, match=rf"num_prefix must be an int in \[0, 9\], got {p}"):
            gather(tokens, keep, None, p)
    with pytest.raises(RuntimeError, match=r"fuse_weights must be a 2-D tensor of dtype torch.float32, "
                                           r"got \(2, 8\) torch.float64"):
        gather(tokens, keep, weights.double(), 1)  # float32 tokens take float32 weights
    with pytest.raises(RuntimeError, match=r"fuse_weights must have shape \(B, L\) = \(2, 8\), got \(2, 7\)"):
        gather(tokens, keep, weights[:, :7], 1)
    with pytest.raises(RuntimeError, match=r"grad_kept must have shape \(2, 4, 4\), got \(2, 3, 4\)"):
        backward(torch.randn(2, 3, 4, device=DEVICE), tokens, keep, weights, 1)  # missing the fused row
    with pytest.raises(RuntimeError, match=r"grad_kept must be a 3-D tensor of dtype torch.float32, "
                                           r"got \(2, 3, 4\) torch.float16"):
        backward(torch.randn(2, 3, 4, device=DEVICE).half(), tokens, keep, None, 1)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="one CUDA device .*, got tokens on meta, keep_index on meta"):
            gather(tokens.to("meta"), keep.to("meta"), None, 1)
    out = gather(tokens, keep, weights, 1)
    assert out.shape == (2, 4, 4)


def test_backend_namespace():
    """The triton backend of clipfast.ops.token_keep resolves to these launchers."""
    from clipfast.ops.token_keep import KERNELS

    ns = KERNELS.kernels("triton")
    assert (ns.index, ns.gather, ns.gather_backward) == (T.token_keep_index_triton, T.token_keep_gather_triton,
                                                         T.token_keep_gather_backward_triton)


def test_kernel_configs():
    for length, block in ((196, 1), (196, 2), (576, 2), (1, 1)):
        cfg = T.kernel_configs(length, 768, block)
        assert set(cfg) == {"index", "gather", "fused", "backward"}
        index = cfg["index"]
        assert index["BLOCK_I"] <= 256 and index["BLOCK_I"] * index["BLOCK_J"] <= 4096
    assert T.kernel_configs(10, 3)["gather"]["BLOCK_D"] == 4
