"""Triton feature-Gram launchers against the float64 reference (clipfast.reference.schur_covariance).

The reference runs in float64 on the *same* (already rounded) inputs, so every difference is error
made by the kernels.

Tolerances
* fp32 inputs, input_precision="ieee": Gram sums rtol 1e-5 with atol 1e-5 * max|ref| (sums over n
  grow with n, so the absolute part is relative to the block's scale); gradients rtol 1e-4 with
  atol 1e-4 * max|ref|.
* fp16 / bf16 inputs, FlashAttention-style: max|out - ref| <= 2 * max|torch - ref| +
  eps(dtype) * max|ref|, where ``torch`` is the plain torch computation in the input dtype
  (features, Gram products and the chain rule rounded to that dtype).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is unavailable), so shapes are small (n <= 300, d <= 48, m <= 24).
With the real block sizes such F fit one tile; ``small_blocks`` shrinks the blocks (and the
backward's row chunk) to exercise multi-tile grids, the mirrored symmetric tiles, an rff cos/sin
boundary inside a tile, and several backward row chunks.
"""

import math

import pytest
import torch

try:
    import triton
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.testing import assert_close_relative, assert_within_low_precision_bound
from clipfast.reference.schur_covariance import (gram_features_reference,
                                                 schur_covariance_gram_backward_reference,
                                                 schur_covariance_gram_reference)
from clipfast.triton_kernels import schur_covariance as K
from clipfast.triton_kernels.interpreter_patches import patch_bf16_dot
from gemm_work import count_dot_flops, emulate_tf32_dot

DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"
COVARIANCES = ("column_cosine", "row_cosine", "rff")
LOW_PRECISION = (torch.float16, torch.bfloat16)
SHAPES = ((37, 19, 5), (1, 19, 5), (300, 48, 24))  # (n, d, m)


@pytest.fixture(scope="module", autouse=True)
def _interpreter_bf16_dot():
    patch_bf16_dot()


def _inputs(n, d, m, dtype=torch.float32, seed=0):
    """image, text (n, d) rounded to ``dtype`` and omegas (d, m) fp32 with phases u = z W ~ N(0, 4)."""
    g = torch.Generator().manual_seed(seed)
    text = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype).to(DEVICE)
    image = (torch.randn(n, d, generator=g) / math.sqrt(d) + 0.3 * text.float().cpu()).to(dtype).to(DEVICE)
    omegas = (2.0 * torch.randn(d, m, generator=g)).to(DEVICE)
    return image, text, omegas


def _grads(f, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(f, f, generator=g).to(DEVICE) for _ in range(3))


def _within_bound(out, ref, low, dtype, name):
    """FA's rule with the dtype's epsilon as the floor: G (or the features) is rounded to the input dtype
    before the tensor-core dot, one rounding plain PyTorch does not make."""
    assert_within_low_precision_bound(out, low, ref, dtype, name, floor=torch.finfo(dtype).eps)


def _reference(image, text, cov, omegas, grads):
    """float64 (S_tt, S_tx, S_xx) and (d_image, d_text) on CPU."""
    x, t, w = image.cpu().double(), text.cpu().double(), omegas.cpu().double()
    grams = schur_covariance_gram_reference(x, t, cov, w)
    d = schur_covariance_gram_backward_reference(*(g.cpu().double() for g in grads), x, t, cov, w)
    return grams, d


def _phi_low(z, cov, w):
    """Plain torch feature map in z's dtype."""
    if cov == "column_cosine":
        return z
    if cov == "row_cosine":
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = z @ w.to(z.dtype)
    return torch.cat([torch.cos(u), torch.sin(u)], 1) / math.sqrt(w.shape[1])


def _torch_low(image, text, cov, omegas, grads):
    """The same computation as the reference in the input dtype (what plain torch users get)."""
    x, t, w = image.cpu(), text.cpu(), omegas.cpu()
    g_tt, g_tx, g_xx = (g.cpu().to(t.dtype) for g in grads)
    px, pt = _phi_low(x, cov, w), _phi_low(t, cov, w)
    grams = (pt.T @ pt, pt.T @ px, px.T @ px)
    dpx, dpt = px @ (g_xx + g_xx.T) + pt @ g_tx, pt @ (g_tt + g_tt.T) + px @ g_tx.T

    def chain(z, phi, dphi):
        if cov == "column_cosine":
            return dphi
        if cov == "row_cosine":
            norm = z.norm(dim=1, keepdim=True)
            return (dphi - phi * (phi * dphi).sum(1, keepdim=True)) / norm.clamp_min(1e-12)
        m = w.shape[1]
        wl = w.to(z.dtype)
        u = z @ wl
        return ((torch.cos(u) * dphi[:, m:] - torch.sin(u) * dphi[:, :m]) / math.sqrt(m)) @ wl.T

    return grams, (chain(x, px, dpx), chain(t, pt, dpt))


def _run(image, text, cov, omegas, grads, **kw):
    grams = K.schur_covariance_gram_triton(image, text, cov, omegas, **kw)
    d = K.schur_covariance_gram_backward_triton(*grads, image, text, cov, omegas, **kw)
    return grams, d


def _check_fp32(image, text, cov, omegas):
    n, d = image.shape
    f = 2 * omegas.shape[1] if cov == "rff" else d
    grads = _grads(f)
    grams, (d_image, d_text) = _run(image, text, cov, omegas, grads)
    ref_grams, (ref_dx, ref_dt) = _reference(image, text, cov, omegas, grads)
    for out, ref in zip(grams, ref_grams):
        assert out.dtype == torch.float32 and out.shape == (f, f) and out.is_contiguous()
        assert_close_relative(out, ref, rtol=1e-5, atol_rel=1e-5)
    assert d_image.shape == d_text.shape == (n, d) and d_image.dtype == d_text.dtype == image.dtype
    assert_close_relative(d_text, ref_dt, rtol=1e-4, atol_rel=1e-4)
    assert_close_relative(d_image, ref_dx, rtol=1e-4, atol_rel=1e-4)


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide blocks and 32-row backward chunks (multi-tile grids at interpreter sizes)."""
    real = K.kernel_configs

    def configs(F, d, dtype, precision="ieee"):
        cfg = real(F, d, dtype, precision)
        cfg["gram"].update(BLOCK_N=16, BLOCK_F=16)
        cfg["features"].update(BLOCK_N=16, BLOCK_M=16, BLOCK_K=16)
        cfg["grad"].update(BLOCK_N=16, BLOCK_C=16, BLOCK_F=16)
        return cfg

    monkeypatch.setattr(K, "kernel_configs", configs)
    monkeypatch.setattr(K, "_CHUNK_ELEMS", 32 * 48)


# ----------------------------------------------------------------------------------------
# fp32, input_precision="ieee"
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cov", COVARIANCES)
def test_fp32(shape, cov):
    image, text, omegas = _inputs(*shape)
    _check_fp32(image, text, cov, omegas)


@pytest.mark.parametrize("cov", COVARIANCES)
def test_fp32_multi_tile(cov, small_blocks):
    # F = 48 (rff: m = 24, cos/sin boundary inside tile 1) -> 3 x 3 tiles of 16; n = 67 rows in
    # backward chunks of 32 (F = 48) with a ragged last chunk.
    image, text, omegas = _inputs(67, 48 if cov != "rff" else 21, 24)
    _check_fp32(image, text, cov, omegas)


# ----------------------------------------------------------------------------------------
# fp16 / bf16
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("cov", COVARIANCES)
@pytest.mark.parametrize("shape", [(37, 19, 5), (130, 48, 24)])
def test_low_precision(dtype, cov, shape):
    image, text, omegas = _inputs(*shape, dtype=dtype)
    f = 2 * shape[2] if cov == "rff" else shape[1]
    grads = _grads(f)
    grams, d = _run(image, text, cov, omegas, grads)
    ref_grams, ref_d = _reference(image, text, cov, omegas, grads)
    low_grams, low_d = _torch_low(image, text, cov, omegas, grads)
    for name, out, ref, low in zip(("S_tt", "S_tx", "S_xx"), grams, ref_grams, low_grams):
        assert out.dtype == torch.float32
        _within_bound(out, ref, low, dtype, name)
    for name, out, ref, low in zip(("d_image", "d_text"), d, ref_d, low_d):
        assert out.dtype == dtype
        _within_bound(out, ref, low, dtype, name)


def test_low_precision_multi_tile(small_blocks):
    image, text, omegas = _inputs(67, 21, 24, dtype=torch.bfloat16)
    grads = _grads(48)
    grams, d = _run(image, text, "rff", omegas, grads)
    ref_grams, ref_d = _reference(image, text, "rff", omegas, grads)
    low_grams, low_d = _torch_low(image, text, "rff", omegas, grads)
    for out, ref, low in zip((*grams, *d), (*ref_grams, *ref_d), (*low_grams, *low_d)):
        _within_bound(out, ref, low, torch.bfloat16, "rff multi-tile")


# ----------------------------------------------------------------------------------------
# Layout, edge cases
# ----------------------------------------------------------------------------------------


def _strided_copies(t):
    """Same values as ``t`` in two non-contiguous layouts: column-major and a strided slice."""
    transposed = t.T.contiguous().T
    big = torch.zeros(2 * t.shape[0], 3 * t.shape[1], dtype=t.dtype, device=t.device)
    big[::2, ::3] = t
    return transposed, big[::2, ::3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cov", ["row_cosine", "rff"])
def test_non_contiguous_inputs(dtype, cov):
    image, text, omegas = _inputs(37, 19, 5, dtype=dtype)
    grads = _grads(10 if cov == "rff" else 19)
    expected = _run(image, text, cov, omegas, grads)
    x_t, x_s = _strided_copies(image)
    t_t, t_s = _strided_copies(text)
    w_t, _ = _strided_copies(omegas)
    assert not any(v.is_contiguous() for v in (x_t, x_s, t_t, t_s, w_t))
    for xv, tv in ((x_s, t_t), (x_t, t_s)):
        grams, d = _run(xv, tv, cov, w_t, tuple(g.T.contiguous().T for g in grads))
        # Same values, same tile order: only the addressing differs in the kernels. The torch
        # chain rule (rff: z @ W, du @ W^T) may pick another BLAS order for strided operands.
        for out, exp in zip(grams, expected[0]):
            torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
        for out, exp in zip(d, expected[1]):
            assert_close_relative(out, exp.float(), rtol=1e-5, atol_rel=1e-5)


def test_deterministic():
    image, text, omegas = _inputs(67, 19, 5)
    first = _run(image, text, "rff", omegas, _grads(10))
    second = _run(image, text, "rff", omegas, _grads(10))
    for a, b in zip((*first[0], *first[1]), (*second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cov", COVARIANCES)
def test_launchers_never_read_a_tensor_on_the_host(cov, monkeypatch):
    """No host sync inside the op (DESIGN section 7): the backward's power-of-two scaling of G stays a device
    tensor. Every way of reading a tensor's value on the host raises during the launches."""
    image, text, omegas = _inputs(37, 19, 5)
    grads = _grads(2 * omegas.shape[1] if cov == "rff" else 19)

    def host_read(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host inside a launcher")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    grams, d = _run(image, text, cov, omegas, grads)
    monkeypatch.undo()
    assert all(torch.isfinite(t).all() for t in (*grams, *d))


def test_symmetric_blocks_mirror_off_diagonal_tiles(small_blocks):
    # Tiles above the diagonal are stored twice (transposed), so off-diagonal tiles are exact
    # mirrors; inside a diagonal tile symmetry holds to rounding only.
    image, text, omegas = _inputs(40, 19, 24)
    tile = torch.arange(48, device=DEVICE) // 16
    off_diag = tile[:, None] != tile[None, :]
    for s in K.schur_covariance_gram_triton(image, text, "rff", omegas)[::2]:
        assert torch.equal(s[off_diag], s.T[off_diag])
        torch.testing.assert_close(s, s.T, rtol=1e-6, atol=1e-6)


def test_zero_row_is_clamped():
    # row_cosine: a zero row has phi = 0 (norm clamped at 1e-12) and adds nothing to the sums.
    image, text, omegas = _inputs(37, 19, 5)
    text[3] = 0.0
    grams = K.schur_covariance_gram_triton(image, text, "row_cosine")
    ref = schur_covariance_gram_reference(image.cpu().double(), text.cpu().double(), "row_cosine")
    for out, r in zip(grams, ref):
        assert_close_relative(out, r, rtol=1e-5, atol_rel=1e-5)


# ----------------------------------------------------------------------------------------
# fp32, input_precision="tf32" (PyTorch's "high" / "medium" float32 matmul precision)
# ----------------------------------------------------------------------------------------

# The interpreter multiplies exact fp32; emulate_tf32_dot truncates the dot operands to 10 mantissa bits
# as the GPU's tf32 tensor cores do, so these bounds hold on the GPU too. A truncated product is off by
# at most 2 * 2^-10 of |a b|, so a Gram entry by at most 2^-9 sum_n |phi_a[n, i]| |phi_b[n, j]| (rigorous;
# + 1e-5 relative for the fp32 summation). Gradients and rff chain two tf32 dots (phases, then the
# Gram or dPhi product): those are checked at 2^-7 of max|ref|, four times one dot's worst case.
TF32_DOT = 2.0 ** -9
TF32_CHAINED = 2.0 ** -7


@pytest.mark.parametrize("cov", COVARIANCES)
def test_tf32(cov, small_blocks):
    image, text, omegas = _inputs(67, 48 if cov != "rff" else 21, 24)
    f = 48
    grads = _grads(f)
    with emulate_tf32_dot():
        grams, d = _run(image, text, cov, omegas, grads, input_precision="tf32")
    ref_grams, ref_d = _reference(image, text, cov, omegas, grads)
    t, x, w = text.cpu().double(), image.cpu().double(), omegas.cpu().double()
    phi_t, phi_x = (gram_features_reference(z, cov, w).abs() for z in (t, x))
    for out, ref, (pa, pb) in zip(grams, ref_grams, ((phi_t, phi_t), (phi_t, phi_x), (phi_x, phi_x))):
        err = (out.cpu().double() - ref).abs()
        if cov == "rff":
            assert err.max() <= TF32_CHAINED * ref.abs().max()
        else:
            assert (err <= TF32_DOT * (pa.T @ pb) + 1e-5 * ref.abs().max()).all()
        # ... and tf32 is really in use: exact fp32 would be far tighter.
        assert err.max() > 1e-5 * ref.abs().max()
    for out, ref in zip(d, ref_d):
        assert (out.cpu().double() - ref).abs().max() <= TF32_CHAINED * ref.abs().max()


def test_precision_ignored_for_16_bit():
    image, text, omegas = _inputs(37, 19, 5, dtype=torch.bfloat16)
    grads = _grads(10)
    ieee = _run(image, text, "rff", omegas, grads)
    with emulate_tf32_dot():
        tf32 = _run(image, text, "rff", omegas, grads, input_precision="tf32")
    for a, b in zip((*ieee[0], *ieee[1]), (*tf32[0], *tf32[1])):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# GEMM work (DESIGN.md section 8): every executed tl.dot, 2 M K N flops each
# ----------------------------------------------------------------------------------------


def _stated_gemm_equivalents(cov, n, d, f, block_f):
    """The module docstring's counts for whole blocks: forward 2 + 1/T (+ d/F for rff), backward 4 (+ d/F)."""
    tiles = f // block_f
    features = d / f if cov == "rff" else 0.0
    return 2 + 1 / tiles + features, 4 + features


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="counts tl.dot calls of the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cov", COVARIANCES)
def test_gemm_work(cov, dtype, small_blocks):
    # Whole 16-blocks: n = 64 rows (backward chunks of 16 rows: F = 64 and 32 * 48 elements a chunk),
    # F = 64 features (T = 4 tiles), d = 32 (rff: m = 32).
    n, d, m = 64, (64 if cov != "rff" else 32), 32
    f = 2 * m if cov == "rff" else d
    image, text, omegas = _inputs(n, d, m, dtype=dtype)
    with count_dot_flops() as fwd:
        K.schur_covariance_gram_triton(image, text, cov, omegas)
    with count_dot_flops() as bwd:
        K.schur_covariance_gram_backward_triton(*_grads(f), image, text, cov, omegas)
    stated_fwd, stated_bwd = _stated_gemm_equivalents(cov, n, d, f, block_f=16)
    assert fwd.gemm_equivalents(f, n, f) == pytest.approx(stated_fwd, rel=1e-12)
    assert bwd.gemm_equivalents(f, n, f) == pytest.approx(stated_bwd, rel=1e-12)
    # The minimum: the Gram's two halves plus S_tx, and four (n x F) @ (F x F) products back.
    assert stated_fwd <= 2 + 1 / 4 + d / f and stated_bwd <= 4 + d / f


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="counts tl.dot calls of the Triton interpreter")
def test_gemm_work_real_configs():
    # The launch configuration that runs (BLOCK_F = 64): F = 128, two tiles, rff phases once per row.
    n, d, m = 128, 64, 64
    image, text, omegas = _inputs(n, d, m, dtype=torch.bfloat16)
    with count_dot_flops() as fwd:
        K.schur_covariance_gram_triton(image, text, "rff", omegas)
    assert fwd.gemm_equivalents(128, n, 128) == pytest.approx(2 + 1 / 2 + d / 128)


@pytest.mark.parametrize("cov", COVARIANCES)
def test_empty_batch(cov):
    image, text, omegas = _inputs(0, 19, 5)
    f = 10 if cov == "rff" else 19
    grams, (d_image, d_text) = _run(image, text, cov, omegas, _grads(f))
    for s in grams:
        assert s.shape == (f, f) and s.dtype == torch.float32 and not s.any()
    assert d_image.shape == d_text.shape == (0, 19)


def test_rff_zero_input_dim():
    # d = 0: u = 0, so every cos feature is 1 / sqrt(m) and every sin feature 0.
    image, text, omegas = _inputs(7, 0, 5)
    s_tt, s_tx, s_xx = K.schur_covariance_gram_triton(image, text, "rff", omegas)
    expected = torch.zeros(10, 10, dtype=torch.float64)
    expected[:5, :5] = 7 / 5
    for s in (s_tt, s_tx, s_xx):
        assert_close_relative(s, expected, rtol=1e-6, atol_rel=1e-6)
    d_image, d_text = K.schur_covariance_gram_backward_triton(*_grads(10), image, text, "rff", omegas)
    assert d_image.shape == d_text.shape == (7, 0)


# ----------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------


def test_invalid_inputs():
    """User arguments are validated by clipfast.schur_covariance and the op; a direct caller that breaks the
    launchers' invariants gets a RuntimeError, never an out-of-bounds launch."""
    image, text, omegas = _inputs(4, 8, 3)
    gram = K.schur_covariance_gram_triton
    with pytest.raises(RuntimeError, match=r"image must be a 2-D tensor .*, got \(8,\)"):
        gram(image[0], text, "column_cosine")
    with pytest.raises(RuntimeError, match=r"image and text must have the same shape and dtype .* and \(3, 8\)"):
        gram(image, text[:3], "column_cosine")
    with pytest.raises(RuntimeError, match=r"image and text must have the same shape and dtype .* and "
                                           r"\(4, 8\) torch.float16"):
        gram(image, text.half(), "column_cosine")
    with pytest.raises(RuntimeError, match=r"image must be a 2-D tensor of dtype torch.float32 or torch.float16 or "
                                           r"torch.bfloat16, got \(4, 8\) torch.float64"):
        gram(image.double(), text.double(), "column_cosine")
    with pytest.raises(RuntimeError, match="image must be a 2-D tensor .*, got list"):
        gram(image.tolist(), text, "column_cosine")
    with pytest.raises(RuntimeError, match="one CUDA device .*, got image on .*, text on meta"):
        gram(image, text.to("meta"), "column_cosine")
    with pytest.raises(RuntimeError, match="covariance must be one of .*, got 'cosine'"):
        gram(image, text, "cosine")
    with pytest.raises(RuntimeError, match=r"covariance 'rff' needs omegas: .*, got NoneType"):
        gram(image, text, "rff", None)
    with pytest.raises(RuntimeError, match=r"covariance 'rff' needs omegas: a float \(d, m\) = \(8, m >= 1\) "
                                           r"tensor, got \(5, 3\)"):
        gram(image, text, "rff", omegas[:5])
    with pytest.raises(RuntimeError, match="one CUDA device .*, omegas on meta"):
        gram(image, text, "rff", omegas.to("meta"))
    with pytest.raises(ValueError, match="input_precision"):
        gram(image, text, "column_cosine", input_precision="tf32x3")
    grads = _grads(8)
    with pytest.raises(RuntimeError, match=r"grad_tx must be a float \(8, 8\) tensor .*, got \(4, 8\)"):
        K.schur_covariance_gram_backward_triton(grads[0], grads[1][:4], grads[2], image, text, "column_cosine")
    with pytest.raises(RuntimeError, match=r"grad_xx must be a float \(8, 8\) tensor .*, got \(8, 8\) torch.int32"):
        K.schur_covariance_gram_backward_triton(grads[0], grads[1], grads[2].int(), image, text, "column_cosine")
    with pytest.raises(RuntimeError, match=r"grad_tt must be a float \(6, 6\) tensor .*, got \(8, 8\)"):
        K.schur_covariance_gram_backward_triton(*grads, image, text, "rff", omegas)  # F = 6, not 8


def test_kernel_configs():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for precision in ("ieee", "tf32"):
            cfg = K.kernel_configs(5000, 512, dtype, precision)
            assert set(cfg) == {"gram", "features", "grad"}
            small = K.kernel_configs(10, 3, dtype, precision)
            assert small["gram"]["BLOCK_F"] == 16 and small["features"]["BLOCK_K"] == 16
            assert small["features"]["BLOCK_M"] == 16
    # 16-bit inputs ignore the fp32 precision; tf32 takes the tensor-core tiles.
    assert K.kernel_configs(512, 512, torch.bfloat16, "tf32") == K.kernel_configs(512, 512, torch.bfloat16)
    assert K.kernel_configs(512, 512, torch.float32, "tf32")["gram"]["BLOCK_N"] == 32
    with pytest.raises(TypeError, match="dtype"):
        K.kernel_configs(64, 64, torch.float64)
    with pytest.raises(ValueError, match="precision"):
        K.kernel_configs(64, 64, torch.float32, "bf16x3")
