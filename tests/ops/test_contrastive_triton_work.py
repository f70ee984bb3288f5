"""The Triton contrastive losses' GEMM work, counted: every ``tl.dot`` the interpreter executes.

DESIGN.md section 8 and ``clipfast/triton_kernels/contrastive.py``: one forward + backward of the
symmetric InfoNCE loss executes 6 N x M x D GEMM-equivalents (2 LSE sweeps + 2 gradient launches
of 2 each: the logit recompute and G @ y), SigLIP 5 (1 + 2 x 2), and the one-directional
rectangular block of the distributed losses 5 (1 + 2 x 2), for every D up to 1280 and in every
precision (exact fp32, tf32, bf16): block sizes only tile the work. With N and M multiples of
every BLOCK_M / BLOCK_N and D of every BLOCK_K / BLOCK_D the tiles are full and the count is exact
(partial tiles would add padded work, which is executed too and counted). The count in
GEMM-equivalents does not depend on N then, so the grid over D and precision runs at the
smallest N = M whose tiles are full in the path's configuration (the interpreter costs ~N^2:
64 for exact fp32, 128 for tf32 and bf16), and one case per loss confirms it at N = M = 256.

The gradient launcher with values of another width E (distillation: G from width-D features,
contracted with width-E values) executes 1 + E / D GEMM-equivalents per launch: the logit
recompute over D and G @ values over E.
"""

import pytest
import torch

pytest.importorskip("triton")

import clipfast  # noqa: E402
from clipfast.testing import unit_features  # noqa: E402
from gemm_work import count_dot_flops  # noqa: E402

FEATURE_DIMS = (512, 768, 1024, 1280)
# (dtype, torch fp32 matmul precision, smallest N = M with full tiles): exact fp32, tf32, bf16
# (whose precision setting is irrelevant).
PATHS = {"fp32": (torch.float32, "highest", 64), "tf32": (torch.float32, "high", 128),
         "bf16": (torch.bfloat16, "highest", 128)}
LIMITS = {"clip": 6, "siglip": 5, "block": 5}


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _forward_backward(loss_name, n, m, d, dtype):
    img = unit_features(n, d, dtype=dtype, seed=1).requires_grad_()
    txt = unit_features(m, d, dtype=dtype, seed=2).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    with clipfast.use_backend("triton"):
        if loss_name == "clip":
            loss = clipfast.clip_loss(img, txt, scale)
        elif loss_name == "siglip":
            loss = clipfast.siglip_loss(img, txt, scale, bias)
        else:  # rows n of a ring step against m keys: one direction, label offset
            loss = clipfast.contrastive_cross_entropy(img, txt, scale, label_offset=m - n)
        loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


@pytest.mark.parametrize("d", FEATURE_DIMS)
@pytest.mark.parametrize("path", ["fp32", "bf16"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_forward_backward_gemm_equivalents(loss_name, path, d, matmul_precision):
    dtype, precision, n = PATHS[path]
    matmul_precision(precision)
    with count_dot_flops() as work:
        _forward_backward(loss_name, n, n, d, dtype)
    assert work.gemm_equivalents(n, d, n) == LIMITS[loss_name], (
        f"{loss_name} {path} D={d}: {work.gemm_equivalents(n, d, n)} GEMM-equivalents, {work.by_shape}")


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_tf32_path_gemm_equivalents(loss_name, matmul_precision):
    dtype, precision, n = PATHS["tf32"]
    matmul_precision(precision)
    with count_dot_flops() as work:
        _forward_backward(loss_name, n, n, 1280, dtype)
    assert work.gemm_equivalents(n, 1280, n) == LIMITS[loss_name]


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_count_at_n_256(loss_name):
    with count_dot_flops() as work:
        _forward_backward(loss_name, 256, 256, 512, torch.bfloat16)
    assert work.gemm_equivalents(256, 512, 256) == LIMITS[loss_name]


@pytest.mark.parametrize("path", ["fp32", "bf16"])
def test_rectangular_block_gemm_equivalents(path, matmul_precision):
    """The distributed losses' block: n local rows against 2n gathered keys, one direction."""
    dtype, precision, n = PATHS[path]
    matmul_precision(precision)
    with count_dot_flops() as work:
        _forward_backward("block", n, 2 * n, 1280, dtype)
    assert work.gemm_equivalents(n, 1280, 2 * n) == LIMITS["block"]


@pytest.mark.parametrize("e", [384, 64])  # several 128-wide E chunks; a narrower BLOCK_D
@pytest.mark.parametrize("path", ["fp32", "bf16"])
def test_gradient_with_values_gemm_equivalents(path, e, matmul_precision):
    """Both gradient launches with values of width E != D: 2 x (1 + E / D) N x M x D GEMM-equivalents."""
    from clipfast.triton_kernels import contrastive as K

    dtype, precision, n = PATHS[path]
    matmul_precision(precision)
    d = 512
    x, y = unit_features(n, d, dtype=dtype, seed=1), unit_features(n, d, dtype=dtype, seed=2)
    x_values, y_values = unit_features(n, e, dtype=dtype, seed=3), unit_features(n, e, dtype=dtype, seed=4)
    scale = torch.tensor(14.3)
    row_lse, col_lse = K.contrastive_lse_triton(x, y, scale, True)
    with count_dot_flops() as work:
        grad_x, grad_y = K.contrastive_grad_triton(x, y, scale, row_lse, col_lse, 0.5, 0.5, x_values, y_values)
    assert grad_x.shape == grad_y.shape == (n, e)
    assert work.gemm_equivalents(n, d, n) == 2 * (1 + e / d), work.by_shape
