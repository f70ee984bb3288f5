"""Triton contrastive / SigLIP launchers against a float64 torch computation.

The reference materialises S = scale * x @ y.T in float64 from the *same* (already rounded)
inputs, so every difference is error made by the kernel.

Tolerances
* fp32 inputs, input_precision="ieee": LSE rtol = atol = 1e-5; gradients rtol 1e-4 with
  atol 1e-4 * max|ref| (relative to the tensor's scale, so that SigLIP gradients of size
  ~1e-4 at bias -10 are still checked); softplus sums rtol 1e-5 with a tiny atol, which a
  naive log(1 + exp(-|z|)) would fail (it loses ~1e-3 relative accuracy at z ~ -10).
* fp16 / bf16 inputs, FlashAttention-style: max|out - ref| <= 2 * max|torch - ref| +
  eps(dtype) * max|ref|, where ``torch`` is the plain torch computation in the input dtype
  (logits, softmax/sigmoid and products rounded to that dtype) - the accuracy users get
  today. The floor of one dtype epsilon relative to the output size keeps the rule
  meaningful if the torch error happens to be ~0. Statistics that the kernel keeps in fp32
  end to end (LSE, softplus sums, sigmoid row sums) are additionally held to fp32
  tolerances; only the gradients pass G through the input dtype for the second GEMM.

Gradients are also checked for exact linearity in tiny weights (~1/N, as the loss layer
passes them), which fp16 would flush to zero if the weights were folded into G.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is unavailable). Shapes are small (N, M <= 130, D <= 96) because
the interpreter is ~1000x slower than a GPU; the exceptions, D = 300 and D = 1280 with few
rows (and values of width E = 300), exercise several D (E) chunks with the real block sizes.

fp32 with input_precision="tf32" is checked against bounds derived from the operands'
truncation to tf32 (see ``_tf32_bounds``), with the GPU's truncation emulated in the
interpreter; 16-bit inputs ignore the flag.
"""

import math

import pytest
import torch
import torch.nn.functional as F

try:
    import triton
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.testing import assert_within_low_precision_bound
from clipfast.triton_kernels import contrastive as K
from clipfast.triton_kernels.interpreter_patches import patch_bf16_dot

DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"
LOW_PRECISION = (torch.float16, torch.bfloat16)
SCALES = (1.0, 14.3, 100.0)
SHAPES = ((67, 45, 37), (1, 45, 37), (45, 1, 96), (128, 96, 64))


@pytest.fixture(scope="module", autouse=True)
def _interpreter_bf16_dot():
    patch_bf16_dot()


def _features(n, d, dtype, seed):
    """(n, d) rows of unit norm (so |S| <= scale) rounded to ``dtype``, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).to(DEVICE)


def _pair(n, m, d, dtype=torch.float32, seed=0):
    return _features(n, d, dtype, seed), _features(m, d, dtype, seed + 1)


def _scalar(value):
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


def _logits64(x, y, scale):
    """S = scale * x @ y.T: (N, M) float64 on CPU."""
    return scale * (x.cpu().double() @ y.cpu().double().T)


def _within_bound(out, ref, low, dtype, name):
    """FA's rule with the dtype's epsilon as the floor: G (or the features) is rounded to the input dtype
    before the tensor-core dot, one rounding plain PyTorch does not make."""
    assert_within_low_precision_bound(out, low, ref, dtype, name, floor=torch.finfo(dtype).eps)


def _close(out, ref, rtol, atol_rel=None, atol=None):
    """assert_close on CPU float64 with atol either absolute or relative to max|ref|."""
    ref = ref.cpu().double()
    if atol is None:
        atol = atol_rel * max(ref.abs().max().item(), 1e-30) if ref.numel() else 0.0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=rtol, atol=atol)


def _softmax_grad64(s, row_weight, col_weight):
    """G = row_weight * softmax_rows(S) + col_weight * softmax_cols(S), float64."""
    return row_weight * torch.softmax(s, 1) + col_weight * torch.softmax(s, 0)


# ----------------------------------------------------------------------------------------
# fp32, input_precision="ieee"
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_lse_fp32(shape, scale):
    n, m, d = shape
    x, y = _pair(n, m, d)
    row, col = K.contrastive_lse_triton(x, y, _scalar(scale), True)
    s = _logits64(x, y, scale)
    assert row.dtype == col.dtype == torch.float32 and row.shape == (n,) and col.shape == (m,)
    _close(row, s.logsumexp(1), rtol=1e-5, atol=1e-5)
    _close(col, s.logsumexp(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiple_d_chunks(dtype):
    # D larger than the grad kernel's BLOCK_D (128), with a ragged last chunk: the gradient
    # kernel contracts each G tile with y chunk by chunk, accumulating into its own rows.
    n, m, d = 20, 30, 300
    assert K.kernel_configs(d, dtype)["grad"]["BLOCK_D"] < d
    x, y = _pair(n, m, d, dtype)
    s = _logits64(x, y, 14.3)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, _scalar(14.3), True)
    _close(row_lse, s.logsumexp(1), rtol=1e-5, atol=1e-5)
    gx, gy = K.contrastive_grad_triton(x, y, _scalar(14.3), row_lse, col_lse, 0.5, 0.5)
    gx_s, gy_s, g_sum = K.siglip_grad_triton(x, y, _scalar(14.3), _scalar(-10.0))
    g, p = _softmax_grad64(s, 0.5, 0.5), torch.sigmoid(s - 10.0)
    xd, yd = x.cpu().double(), y.cpu().double()
    # 16-bit: G is rounded to the input dtype for the second GEMM (see module docstring).
    rtol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for out, ref in ((gx, g @ yd), (gy, g.T @ xd), (gx_s, p @ yd), (gy_s, p.T @ xd)):
        _close(out, ref, rtol=rtol, atol_rel=rtol)
    _close(g_sum, p.sum(1), rtol=1e-5, atol_rel=1e-6)


def test_lse_without_cols_returns_empty():
    x, y = _pair(67, 45, 37)
    row, col = K.contrastive_lse_triton(x, y, _scalar(14.3), False)
    assert col.shape == (0,) and col.dtype == torch.float32
    _close(row, _logits64(x, y, 14.3).logsumexp(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.25, 1.0)])
def test_contrastive_grad_fp32(shape, scale, weights):
    n, m, d = shape
    x, y = _pair(n, m, d)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, _scalar(scale), True)
    gx, gy = K.contrastive_grad_triton(x, y, _scalar(scale), row_lse, col_lse, *weights)
    g = _softmax_grad64(_logits64(x, y, scale), *weights)
    assert gx.dtype == gy.dtype == torch.float32 and gx.shape == (n, d) and gy.shape == (m, d)
    _close(gx, g @ y.cpu().double(), rtol=1e-4, atol_rel=1e-4)
    _close(gy, g.T @ x.cpu().double(), rtol=1e-4, atol_rel=1e-4)


def test_contrastive_grad_empty_col_lse_drops_column_term():
    x, y = _pair(67, 45, 37)
    row_lse, _ = K.contrastive_lse_triton(x, y, _scalar(14.3), False)
    empty = torch.empty(0, dtype=torch.float32, device=DEVICE)
    gx, gy = K.contrastive_grad_triton(x, y, _scalar(14.3), row_lse, empty, 1.0, 0.7)
    g = _softmax_grad64(_logits64(x, y, 14.3), 1.0, 0.0)
    _close(gx, g @ y.cpu().double(), rtol=1e-4, atol_rel=1e-4)
    _close(gy, g.T @ x.cpu().double(), rtol=1e-4, atol_rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_contrastive_grad_tiny_weights(dtype):
    # Callers pass weights ~1/N (0.5 / 32768 ~ 1.5e-5); weight * probability then lies below
    # fp16's smallest subnormal (6e-8). Gradients must still be linear in the weights.
    x, y = _pair(67, 45, 37, dtype)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, _scalar(14.3), True)
    unit = K.contrastive_grad_triton(x, y, _scalar(14.3), row_lse, col_lse, 0.5, 0.25)
    tiny = K.contrastive_grad_triton(x, y, _scalar(14.3), row_lse, col_lse, 0.5e-6, 0.25e-6)
    for a, b in zip(unit, tiny):
        torch.testing.assert_close(b, a * 1e-6, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bias", [0.0, -10.0])
def test_siglip_fp32(shape, scale, bias):
    n, m, d = shape
    x, y = _pair(n, m, d)
    z = _logits64(x, y, scale) + bias
    row_sum = K.siglip_softplus_triton(x, y, _scalar(scale), _scalar(bias))
    assert row_sum.dtype == torch.float32 and row_sum.shape == (n,)
    _close(row_sum, F.softplus(z).sum(1), rtol=1e-5, atol=1e-30)
    gx, gy, g_sum = K.siglip_grad_triton(x, y, _scalar(scale), _scalar(bias))
    g = torch.sigmoid(z)
    assert gx.shape == (n, d) and gy.shape == (m, d) and g_sum.shape == (n,)
    _close(gx, g @ y.cpu().double(), rtol=1e-4, atol_rel=1e-4)
    _close(gy, g.T @ x.cpu().double(), rtol=1e-4, atol_rel=1e-4)
    _close(g_sum, g.sum(1), rtol=1e-5, atol_rel=1e-6)


# ----------------------------------------------------------------------------------------
# fp16 / bf16
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape", [(67, 45, 37), (130, 70, 96)])
def test_low_precision(dtype, scale, shape):
    n, m, d = shape
    x, y = _pair(n, m, d, dtype)
    xc, yc = x.cpu(), y.cpu()
    s = _logits64(x, y, scale)
    s_low = (xc @ yc.T) * torch.tensor(scale, dtype=dtype)  # plain torch in the input dtype
    sc = _scalar(scale)

    row_lse, col_lse = K.contrastive_lse_triton(x, y, sc, True)
    for out, ref, low, name in ((row_lse, s.logsumexp(1), s_low.logsumexp(1), "row_lse"),
                                (col_lse, s.logsumexp(0), s_low.logsumexp(0), "col_lse")):
        _within_bound(out, ref, low, dtype, name)
        _close(out, ref, rtol=1e-5, atol=1e-5)

    gx, gy = K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, 0.5, 0.5)
    g, g_low = _softmax_grad64(s, 0.5, 0.5), 0.5 * torch.softmax(s_low, 1) + 0.5 * torch.softmax(s_low, 0)
    _within_bound(gx, g @ yc.double(), g_low @ yc, dtype, "grad_x")
    _within_bound(gy, g.T @ xc.double(), g_low.T @ xc, dtype, "grad_y")

    bias = -10.0
    z, z_low = s + bias, s_low + torch.tensor(bias, dtype=dtype)
    row_sum = K.siglip_softplus_triton(x, y, sc, _scalar(bias))
    _within_bound(row_sum, F.softplus(z).sum(1), F.softplus(z_low).sum(1), dtype, "softplus")
    _close(row_sum, F.softplus(z).sum(1), rtol=1e-5, atol=1e-30)

    sgx, sgy, g_sum = K.siglip_grad_triton(x, y, sc, _scalar(bias))
    p, p_low = torch.sigmoid(z), torch.sigmoid(z_low)
    _within_bound(sgx, p @ yc.double(), p_low @ yc, dtype, "siglip grad_x")
    _within_bound(sgy, p.T @ xc.double(), p_low.T @ xc, dtype, "siglip grad_y")
    _within_bound(g_sum, p.sum(1), p_low.sum(1), dtype, "siglip row sum")
    _close(g_sum, p.sum(1), rtol=1e-5, atol_rel=1e-6)


# ----------------------------------------------------------------------------------------
# Values of another width (distillation): G from x, y (width D), products with the values
# x_values (N, E) and y_values (M, E)
# ----------------------------------------------------------------------------------------

VALUE_WEIGHTS = {"both": (0.5, 0.5), "row": (1.0, 0.0), "col": (0.0, 1.0)}


def _values(n, m, e, dtype=torch.float32, seed=10):
    """(x_values, y_values): (n, e) and (m, e) unit rows, independent of the features."""
    return _features(n, e, dtype, seed), _features(m, e, dtype, seed + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e", [48, 8])  # D = 32: wider values, and narrower than the tl.dot minimum of 16
@pytest.mark.parametrize("terms", list(VALUE_WEIGHTS))
def test_contrastive_grad_values(dtype, e, terms):
    n, m, d, scale = 67, 45, 32, 14.3
    weights = VALUE_WEIGHTS[terms]
    x, y = _pair(n, m, d, dtype)
    xv, yv = _values(n, m, e, dtype)
    sc = _scalar(scale)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, sc, True)
    gx, gy = K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, *weights, xv, yv)
    assert gx.dtype == gy.dtype == torch.float32 and gx.shape == (n, e) and gy.shape == (m, e)
    # float64 reference: G from the features, the products with the values.
    g = _softmax_grad64(_logits64(x, y, scale), *weights)
    xv64, yv64 = xv.cpu().double(), yv.cpu().double()
    if dtype == torch.float32:
        _close(gx, g @ yv64, rtol=1e-4, atol_rel=1e-4)
        _close(gy, g.T @ xv64, rtol=1e-4, atol_rel=1e-4)
    else:  # plain torch in bf16: logits, softmax and products rounded to bf16
        s_low = (x.cpu() @ y.cpu().T) * torch.tensor(scale, dtype=dtype)
        g_low = weights[0] * torch.softmax(s_low, 1) + weights[1] * torch.softmax(s_low, 0)
        _within_bound(gx, g @ yv64, g_low @ yv.cpu(), dtype, "grad_x")
        _within_bound(gy, g.T @ xv64, g_low.T @ xv.cpu(), dtype, "grad_y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_contrastive_grad_values_several_chunks(dtype):
    # E = 300 > BLOCK_D (128) with a ragged last chunk, while the logit tile runs over D = 32.
    n, m, d, e = 20, 30, 32, 300
    assert K.kernel_configs(d, dtype, E=e)["grad"]["BLOCK_D"] < e
    x, y = _pair(n, m, d, dtype)
    xv, yv = _values(n, m, e, dtype)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, _scalar(14.3), True)
    gx, gy = K.contrastive_grad_triton(x, y, _scalar(14.3), row_lse, col_lse, 0.5, 0.5, xv, yv)
    g = _softmax_grad64(_logits64(x, y, 14.3), 0.5, 0.5)
    rtol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # G rounded to bf16 (docstring)
    _close(gx, g @ yv.cpu().double(), rtol=rtol, atol_rel=rtol)
    _close(gy, g.T @ xv.cpu().double(), rtol=rtol, atol_rel=rtol)


@pytest.mark.parametrize("dtype,precision,narrow_block_d",
                         [(torch.float32, "ieee", 64), (torch.float32, "tf32", 32), (torch.bfloat16, "ieee", 64)])
def test_kernel_configs_tile_each_width(dtype, precision, narrow_block_d):
    # BLOCK_K tiles the logit GEMM over D, BLOCK_D the products over E; E defaults to D.
    plain = K.kernel_configs(1024, dtype, precision)
    assert K.kernel_configs(1024, dtype, precision, E=1024) == K.kernel_configs(1024, dtype, precision, E=384) == plain
    narrow = K.kernel_configs(1024, dtype, precision, E=48)
    assert narrow["row_reduce"] == plain["row_reduce"]
    # tf32 takes E in (32, 64] in two 32-wide chunks: 64 spills on sm_80 (kernel_configs' docstring).
    assert narrow["grad"] == dict(plain["grad"], BLOCK_D=narrow_block_d)
    # 16-bit values never get 16-wide chunks (they spill on sm_80); fp32 shrinks to the tl.dot minimum.
    assert K.kernel_configs(1024, dtype, precision, E=8)["grad"]["BLOCK_D"] == (16 if dtype == torch.float32 else 32)
    small_teacher = K.kernel_configs(20, dtype, precision, E=768)["grad"]
    assert small_teacher["BLOCK_K"] == K.kernel_configs(20, dtype, precision)["grad"]["BLOCK_K"] <= 32
    assert small_teacher["BLOCK_D"] == 128


def test_values_equal_to_features_give_the_default():
    x, y = _pair(67, 45, 37)
    sc = _scalar(14.3)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, sc, True)
    default = K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, 0.5, 0.25)
    explicit = K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, 0.5, 0.25, x, y)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)


def test_non_contiguous_values():
    x, y = _pair(67, 45, 32)
    xv, yv = _values(67, 45, 48)
    sc = _scalar(14.3)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, sc, True)
    expected = K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, 0.5, 0.5, xv, yv)
    xv_t, xv_s = _strided_copies(xv)
    yv_t, yv_s = _strided_copies(yv)
    for xvv, yvv in ((xv_t, yv_s), (xv_s, yv_t)):
        # Same values, same tile order: only the addressing differs.
        for out, exp in zip(K.contrastive_grad_triton(x, y, sc, row_lse, col_lse, 0.5, 0.5, xvv, yvv), expected):
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0)])
def test_values_empty_batches(n, m):
    x, y = _pair(n, m, 32)
    xv, yv = _values(n, m, 48)
    sc = _scalar(14.3)
    row, col = K.contrastive_lse_triton(x, y, sc, True)
    gx, gy = K.contrastive_grad_triton(x, y, sc, row, col, 0.5, 0.5, xv, yv)
    assert gx.shape == (n, 48) and gy.shape == (m, 48) and not gx.any() and not gy.any()
    assert gx.dtype == gy.dtype == torch.float32


def test_values_launch_invariants():
    """Values that break the launch's invariants raise RuntimeError, never an out-of-bounds launch."""
    x, y = _pair(4, 5, 8)
    xv, yv = _values(4, 5, 16)
    sc = _scalar(1.0)
    row, col = K.contrastive_lse_triton(x, y, sc, True)
    for bad_xv, bad_yv, match in ((xv[:3], yv, r"x_values must be \(4, E\)"),
                                  (xv, yv[:4], r"y_values must be \(5, E\)"),
                                  (yv, xv, r"x_values must be \(4, E\)"),  # swapped: rows of the wrong side
                                  (xv[0], yv, r"x_values must be \(4, E\)"),
                                  (xv, yv[:, :12], "one E"),
                                  (xv, None, "given together"), (None, yv, "given together"),
                                  (xv.double(), yv.double(), "like x"), (xv, yv.bfloat16(), "like x"),
                                  (xv, yv.to("meta"), "one CUDA device")):
        with pytest.raises(RuntimeError, match=match):
            K.contrastive_grad_triton(x, y, sc, row, col, 0.5, 0.5, bad_xv, bad_yv)


# ----------------------------------------------------------------------------------------
# Layout, scalars, edge cases
# ----------------------------------------------------------------------------------------


def _strided_copies(t):
    """Same values as ``t`` in two non-contiguous layouts: column-major and a strided slice."""
    transposed = t.T.contiguous().T  # strides (1, rows)
    big = torch.zeros(2 * t.shape[0], 3 * t.shape[1], dtype=t.dtype, device=t.device)
    big[::2, ::3] = t
    return transposed, big[::2, ::3]  # strides (6 * cols, 3)


def _all_outputs(x, y, scale, bias):
    row_lse, col_lse = K.contrastive_lse_triton(x, y, scale, True)
    return (row_lse, col_lse, *K.contrastive_grad_triton(x, y, scale, row_lse, col_lse, 0.5, 0.5),
            K.siglip_softplus_triton(x, y, scale, bias), *K.siglip_grad_triton(x, y, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    x, y = _pair(67, 45, 37, dtype)
    scale, bias = _scalar(14.3), _scalar(-10.0)
    expected = _all_outputs(x, y, scale, bias)
    x_t, x_s = _strided_copies(x)
    y_t, y_s = _strided_copies(y)
    assert not (x_t.is_contiguous() or x_s.is_contiguous() or y_t.is_contiguous() or y_s.is_contiguous())
    for xv, yv in ((x_t, y_s), (x_s, y_t)):
        # Same values, same tile order: only the addressing differs.
        for out, exp in zip(_all_outputs(xv, yv, scale, bias), expected):
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
    s = _logits64(x_t, y_s, 14.3)
    _close(expected[0], s.logsumexp(1), rtol=1e-5, atol=1e-5)


def test_scale_and_bias_accept_one_element_tensors():
    x, y = _pair(67, 45, 37)
    s0 = K.contrastive_lse_triton(x, y, _scalar(14.3), True)
    s1 = K.contrastive_lse_triton(x, y, _scalar(14.3).reshape(1), True)
    s64 = K.contrastive_lse_triton(x, y, torch.tensor([14.3], dtype=torch.float64, device=DEVICE), True)
    for a, b, c in zip(s0, s1, s64):
        assert torch.equal(a, b) and torch.equal(a, c)
    b0 = K.siglip_softplus_triton(x, y, _scalar(14.3), _scalar(-10.0))
    b1 = K.siglip_softplus_triton(x, y, _scalar(14.3).reshape(1), _scalar(-10.0).reshape(1))
    assert torch.equal(b0, b1)


def test_deterministic():
    x, y = _pair(67, 45, 37)
    first = _all_outputs(x, y, _scalar(14.3), _scalar(-10.0))
    second = _all_outputs(x, y, _scalar(14.3), _scalar(-10.0))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# fp32, input_precision="tf32" (tensor cores), emulated here as the GPU computes it
# ----------------------------------------------------------------------------------------

TF32_EPS = 2.0**-10  # a tf32 operand keeps 10 mantissa bits, truncated: relative error < 2^-10


def _tf32_bounds(x, y, scale):
    """Documented tf32 error bounds, derived from operand truncation (gemm_work.emulate_tf32_dot).

    Logits: |dS_ij| <= scale * 2 eps * sum_k |x_ik y_jk| <= delta = 2 eps * scale * max|x_i| |y_j|.
    LSE is 1-Lipschitz in the sup norm: |d lse| <= delta. A softmax / sigmoid entry moves by at
    most a factor exp(+-2 delta) (the row and the column LSE shift too), and the second GEMM
    truncates G and y once more: |d (G @ y)_id| <= (expm1(2 delta) + 2 eps) (G @ |y|)_id.
    """
    norms = x.cpu().double().norm(dim=1).max() * y.cpu().double().norm(dim=1).max()
    delta = float(2 * TF32_EPS * scale * norms)
    return delta, math.expm1(2 * delta) + 2 * TF32_EPS


def _assert_within(out, ref, bound, name):
    err = (out.cpu().double() - ref).abs()
    assert (err <= bound + 1e-6).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_tf32_within_documented_bound(scale):
    from gemm_work import emulate_tf32_dot

    x, y = _pair(67, 45, 37)
    x, y = 3.0 * x, 0.5 * y  # unnormalised
    s = _logits64(x, y, scale)
    delta, rel = _tf32_bounds(x, y, scale)
    sc = _scalar(scale)
    with emulate_tf32_dot():
        row, col = K.contrastive_lse_triton(x, y, sc, True, input_precision="tf32")
        gx, gy = K.contrastive_grad_triton(x, y, sc, row, col, 0.5, 0.5, input_precision="tf32")
        sgx, sgy, _ = K.siglip_grad_triton(x, y, sc, _scalar(-10.0), input_precision="tf32")
        exact_row, _ = K.contrastive_lse_triton(x, y, sc, True, input_precision="ieee")
    _assert_within(row, s.logsumexp(1), delta, "row_lse")
    _assert_within(col, s.logsumexp(0), delta, "col_lse")
    g, p = _softmax_grad64(s, 0.5, 0.5), torch.sigmoid(s - 10.0)
    xa, ya = x.cpu().double(), y.cpu().double()
    _assert_within(gx, g @ ya, rel * (g @ ya.abs()), "grad_x")
    _assert_within(gy, g.T @ xa, rel * (g.T @ xa.abs()), "grad_y")
    _assert_within(sgx, p @ ya, rel * (p @ ya.abs()), "siglip grad_x")
    _assert_within(sgy, p.T @ xa, rel * (p.T @ xa.abs()), "siglip grad_y")
    # The emulation is live: tf32 really differs from exact fp32 here.
    assert not torch.equal(row, exact_row)


def test_tf32_flag_ignored_for_16_bit_inputs():
    x, y = _pair(67, 45, 37, torch.bfloat16)
    a = K.contrastive_lse_triton(x, y, _scalar(14.3), True, input_precision="tf32")
    b = K.contrastive_lse_triton(x, y, _scalar(14.3), True, input_precision="ieee")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------
# The whole op through the Triton backend: odd shapes, D = 1280, label offsets, unnormalised
# features, scale 100, against the float64 reference
# ----------------------------------------------------------------------------------------

OP_CASES = {  # id -> (N, M, D, label_offset, feature scale, logit scale)
    "odd": (37, 53, 19, 11, 1.0, 14.3),
    "wide": (20, 24, 1280, 3, 1.0, 14.3),
    "unnormalised-scale100": (33, 33, 70, 0, 2.5, 100.0),
}


def _op_inputs(case, dtype):
    n, m, d, offset, feature_scale, scale = OP_CASES[case]
    g = torch.Generator().manual_seed(7)
    img = (F.normalize(torch.randn(n, d, generator=g), dim=1) * feature_scale).to(dtype).to(DEVICE)
    txt = (F.normalize(torch.randn(m, d, generator=g), dim=1) / feature_scale).to(dtype).to(DEVICE)
    return ([img.requires_grad_(), txt.requires_grad_(), _scalar(scale).requires_grad_(),
             _scalar(-5.0).requires_grad_()], offset)


def _op_losses(img, txt, scale, bias, offset, backend):
    """(one-directional InfoNCE with smoothing, SigLIP) over the rectangular block, label offset."""
    import clipfast
    from clipfast.reference import clip_loss_reference, siglip_loss_reference

    if backend == "reference":  # plain PyTorch in the inputs' dtype
        return (clip_loss_reference(img, txt, scale, label_offset=offset, symmetric=False, label_smoothing=0.1),
                siglip_loss_reference(img, txt, scale, bias, label_offset=offset))
    with clipfast.use_backend(backend):
        return (clipfast.contrastive_cross_entropy(img, txt, scale, label_offset=offset, label_smoothing=0.1),
                clipfast.siglip_loss(img, txt, scale, bias, label_offset=offset))


def _losses_and_grads(inputs, offset, backend):
    # allow_unused: InfoNCE does not take the bias (its None gradient is skipped below).
    return [(loss, torch.autograd.grad(loss, inputs, allow_unused=True))
            for loss in _op_losses(*inputs, offset, backend)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_through_triton_matches_float64_reference(case, dtype):
    from clipfast.testing import assert_close_to_reference

    inputs, offset = _op_inputs(case, dtype)
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    plain_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    fused = _losses_and_grads(inputs, offset, "triton")
    ref = _losses_and_grads(ref_inputs, offset, "reference")
    plain = _losses_and_grads(plain_inputs, offset, "reference")
    names = ("dimage", "dtext", "dscale", "dbias")
    for (loss, grads), (ref_loss, ref_grads), (plain_loss, plain_grads) in zip(fused, ref, plain):
        if dtype == torch.float32:
            assert_close_to_reference(loss, ref_loss, dtype, "output", f"{case} loss")
            for g, r, name in zip(grads, ref_grads, names):
                assert (g is None) == (r is None), name
                if g is not None:
                    assert_close_to_reference(g.cpu(), r, dtype, "grad", f"{case} {name}")
        else:  # within twice plain PyTorch's own bf16 error (DESIGN.md section 5)
            assert_within_low_precision_bound(loss.cpu(), plain_loss, ref_loss, dtype, f"{case} loss")
            for g, p, r, name in zip(grads[:2], plain_grads[:2], ref_grads[:2], names):
                assert_within_low_precision_bound(g.cpu(), p, r, dtype, f"{case} {name}")


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0)])
def test_empty_batches(n, m):
    x, y = _pair(n, m, 37)
    sc, bias = _scalar(14.3), _scalar(-10.0)
    row, col = K.contrastive_lse_triton(x, y, sc, True)
    # logsumexp over an empty set is -inf.
    assert row.shape == (n,) and col.shape == (m,)
    assert torch.all(row == -math.inf) and torch.all(col == -math.inf)
    assert K.contrastive_lse_triton(x, y, sc, False)[1].shape == (0,)
    gx, gy = K.contrastive_grad_triton(x, y, sc, row, col, 0.5, 0.5)
    assert gx.shape == (n, 37) and gy.shape == (m, 37) and not gx.any() and not gy.any()
    row_sum = K.siglip_softplus_triton(x, y, sc, bias)
    assert row_sum.shape == (n,) and not row_sum.any()
    sgx, sgy, g_sum = K.siglip_grad_triton(x, y, sc, bias)
    assert sgx.shape == (n, 37) and sgy.shape == (m, 37) and g_sum.shape == (n,)
    assert not (sgx.any() or sgy.any() or g_sum.any())
    for out in (row, col, gx, gy, row_sum, sgx, sgy, g_sum):
        assert out.dtype == torch.float32


def test_zero_feature_dim():
    # D = 0 makes every logit 0: LSE = log(M), softplus sum = M * softplus(bias).
    x, y = _pair(3, 4, 0)
    row, col = K.contrastive_lse_triton(x, y, _scalar(14.3), True)
    _close(row, torch.full((3,), math.log(4)), rtol=1e-6, atol=1e-6)
    _close(col, torch.full((4,), math.log(3)), rtol=1e-6, atol=1e-6)
    _close(K.siglip_softplus_triton(x, y, _scalar(1.0), _scalar(-2.0)),
           torch.full((3,), 4 * F.softplus(torch.tensor(-2.0, dtype=torch.float64)).item()), rtol=1e-6, atol=0)
    gx, gy, g_sum = K.siglip_grad_triton(x, y, _scalar(1.0), _scalar(-2.0))
    assert gx.shape == (3, 0) and gy.shape == (4, 0)
    _close(g_sum, torch.full((3,), 4 * torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64)).item()),
           rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------


def test_launchers_guard_their_invariants():
    """User input is validated by the registered ops; a direct caller of a launcher that breaks its
    invariants gets a RuntimeError, never an out-of-bounds launch."""
    x, y = _pair(4, 5, 8)
    sc = _scalar(1.0)
    lse = K.contrastive_lse_triton
    for bad, match in (((x[0], y, sc, True), "rows, D"), ((x, y[:, :4], sc, True), "rows, D"),
                       ((x, y.half(), sc, True), "share one of"), ((x.double(), y.double(), sc, True), "share one of"),
                       ((x, y.to("meta"), sc, True), "one CUDA device"),
                       ((x, y, torch.ones(2, device=DEVICE), True), "one-element"),
                       ((x, y, sc.to("meta"), True), "one-element")):
        with pytest.raises(RuntimeError, match=match):
            lse(*bad)
    with pytest.raises(ValueError, match="input_precision"):
        lse(x, y, sc, True, input_precision="tf32x3")
    with pytest.raises(RuntimeError, match="one-element"):
        K.siglip_softplus_triton(x, y, sc, torch.ones(3, device=DEVICE))
    row, col = lse(x, y, sc, True)
    with pytest.raises(RuntimeError, match="LSE term"):
        K.contrastive_grad_triton(x, y, sc, col, col, 0.5, 0.5)
    with pytest.raises(RuntimeError, match="LSE term"):
        K.contrastive_grad_triton(x, y, sc, row, col.double(), 0.5, 0.5)
