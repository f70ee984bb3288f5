"""Triton kernels for the feature Gram sums behind the Schur-complement (kernel covariance) op.

Notation (spec: :mod:`clipfast.reference.schur_covariance`): ``image: (n, d)`` and ``text: (n, d)``
are paired row by row (images first in every signature), ``phi`` maps a row to ``F`` features and

    S_tt = Phi_t^T Phi_t,   S_tx = Phi_t^T Phi_x,   S_xx = Phi_x^T Phi_x          (F, F) fp32 each,

with ``Phi_a = phi(A): (n, F)`` for the covariances ``"column_cosine"`` (the raw rows, F = d; the
column normalisation is applied to the sums afterwards), ``"row_cosine"`` (``z / max(||z||, 1e-12)``,
F = d) and ``"rff"`` (``[cos(z W), sin(z W)] / sqrt(m)``, ``W = omegas: (d, m)``, F = 2m). The sums are
the feature Gram of "Dissecting CLIP" (the Schur-complement kernel covariance); the full ``(n, F)``
feature matrices are never materialised.

Algorithm
---------
* Forward. The sums are a GEMM over the sample axis, ``(F x n) @ (n x F)``.
  ``_schur_covariance_gram_kernel`` (one launch per block ``b``: 0 tt, 1 tx, 2 xx; grid
  ``(cdiv(F, BLOCK_F), cdiv(F, BLOCK_F))``): program ``(i, j)`` owns output tile ``(i, j)``, loops over
  the rows in ``BLOCK_N`` chunks, builds the two ``(BLOCK_N, BLOCK_F)`` feature tiles
  (``_feature_tile``) and accumulates ``tl.dot(feat_a^T, feat_b)`` in fp32 onto the tile's current
  value (so row chunks can be summed by successive launches).
    - column_cosine: the feature tile is the input slice itself (``ROW_SCALE = 0``);
    - row_cosine: the input slice times the rows' inverse norms ``1 / max(||z||, 1e-12)``
      (``ROW_SCALE = 1``), an ``(n,)`` fp32 vector computed by a torch prologue (one O(n d) read of
      the inputs);
    - rff: the features of a chunk of ``R`` rows (``R F <= 2^22``) are computed once by
      ``_schur_covariance_rff_feature_kernel`` (grid ``(cdiv(R, BLOCK_N), cdiv(m, BLOCK_M), 2)``, axis
      2 = x / t): one ``tl.dot`` gives the ``(BLOCK_N, BLOCK_M)`` phase tile ``u = z W[:, cols]``, whose cosines and
      sines are stored to columns ``cols`` and ``m + cols`` of the chunk's ``(2, R, F)`` feature buffer
      in the input dtype. The Gram kernel then reads that buffer as it is (``ROW_SCALE = 0``), one
      launch per block and chunk. Each phase is computed once: no ``z W`` recomputation per output tile.
  S_tt and S_xx are symmetric: their programs with ``i > j`` exit at once and those with ``i < j``
  also store the transposed tile (exact mirrors), so the symmetric blocks cost half.
* Backward (Triton for dPhi, torch for the chain rule). With ``A_x = G_xx + G_xx^T``, ``B_x = G_tx``,
  ``A_t = G_tt + G_tt^T``, ``B_t = G_tx^T`` (O(F^2) torch prologue),
  ``dPhi_x = Phi_x A_x + Phi_t B_x`` and ``dPhi_t = Phi_t A_t + Phi_x B_t``.
  The launcher walks the rows in chunks of ``R`` rows (a Python loop; ``R * F <= 2^22``). For each
  chunk ``_schur_covariance_grad_kernel`` (grid ``(cdiv(R, BLOCK_N), cdiv(F, BLOCK_C), 2)``, axis 2 =
  side x / t) computes the ``(BLOCK_N, BLOCK_C)`` tile of dPhi by looping over the contraction features
  in ``BLOCK_F`` chunks, building the Phi tiles on the fly as in the forward (rff: from the chunk's
  feature buffer, filled first by ``_schur_covariance_rff_feature_kernel``). The chain rule through phi then runs in
  torch on that ``(R, F)`` fp32 chunk:
    - column_cosine: ``dz = dphi``;
    - row_cosine: ``dz = (dphi - phi <phi, dphi>) / max(||z||, 1e-12)`` (radial term dropped
      where ``||z|| <= 1e-12``, as in the reference);
    - rff: with ``phi = [c, s] = [cos u, sin u] / sqrt(m)`` from the feature buffer,
      ``du = c * dphi[:, m:] - s * dphi[:, :m]`` and ``dz = du W^T`` (no second ``z W``).
  Extra memory is O(F^2 + R F), independent of n.

Work (GEMM-equivalents: one is the ``n x F x F`` feature Gram, ``2 n F^2`` flops; every executed
``tl.dot`` counts ``2 M K N`` flops of its padded operand blocks; ``T = cdiv(F, BLOCK_F)``; tests/ops/
test_schur_covariance_triton.py counts them under the interpreter):

    forward  column_cosine / row_cosine   2 + 1/T          (S_tx 1, S_tt and S_xx (T + 1) / 2T each)
             rff                          2 + 1/T + d/F    (d/F: the phases z W of both inputs, once)
    backward column_cosine / row_cosine   4                (two (n x F) @ (F x F) products per side)
             rff                          4 + d/F          (+ d/F of torch GEMM: the chain rule's du W^T)

with n, F, d rounded up to whole blocks. Before this layout the rff features were rebuilt inside
every output tile: ``(4 + 2/T) d / BLOCK_F`` extra forward and ``4 d / BLOCK_C`` extra backward
GEMM-equivalents (d = 512: +34 and +16), and the backward's torch chain rule recomputed ``z W``.
The Gram's minimum is 2 (two symmetric halves and S_tx), the backward's 4.

* Precision. 16-bit inputs run the tensor cores: feature tiles (fp32 in registers for
  row_cosine) and the rff ``W`` tiles are rounded to the input dtype right before each
  ``tl.dot``, the rff features are stored in the input dtype; accumulation is fp32. In the backward
  the ``(F, F)`` matrices are also rounded to the input dtype, after scaling by a power of two
  ``2^-k ~ 1 / max|M|`` (undone exactly in fp32), so small gradients (``G / n``) are not flushed to
  fp16 subnormals. fp32 inputs: every ``tl.dot`` takes fp32 operands with ``input_precision``, which
  the op passes from :func:`clipfast.backends.triton_input_precision` (PyTorch's float32 matmul
  precision): "ieee" is exact fp32 on FMA units, "tf32" runs the tensor cores (operands truncated to
  10 mantissa bits).
* Determinism. Every output element is owned by exactly one program and accumulated in a fixed
  order (row chunks in sequence): no atomics, results are bitwise reproducible run to run.

All launchers accept CUDA tensors, or CPU tensors when Triton runs under its interpreter
(``TRITON_INTERPRET=1`` set before this module is imported). ``image``/``text`` may be float32,
float16 or bfloat16 (same dtype) with arbitrary strides; index arithmetic is 64-bit.
"""

import math

import torch
import triton
import triton.language as tl

from clipfast.triton_kernels import (INPUT_PRECISIONS, check_launch_device, check_tensor, describe, is_interpreted,
                                     resolve_input_precision)

__all__ = [
    "kernel_configs",
    "schur_covariance_gram_backward_triton",
    "schur_covariance_gram_triton",
]

COVARIANCES = ("column_cosine", "row_cosine", "rff")
ROW_NORM_EPS = 1e-12
# The ROW_SCALE constexpr of the Gram and gradient kernels per covariance: 1 multiplies each loaded row by
# its inverse norm; rff runs them on its feature buffer, read as it is.
ROW_SCALE = {"column_cosine": 0, "row_cosine": 1, "rff": 0}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Row chunk of the rff forward and of every backward: at most this many elements of the (R, F)
# feature and dPhi buffers (per side) exist at a time.
_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _cos_sin(u):
    """``(cos(u), sin(u))``, fp32, with no local-memory stack frame.

    ``tl.cos``/``tl.sin`` compile to libdevice's accurate ``cosf``/``sinf``, whose Payne-Hanek
    slow path for huge arguments needs a 32-byte local array (STACK 32 in every rff kernel).
    Here: Cody-Waite reduction ``u = k pi/2 + r``, ``|r| <= pi/4`` with pi/2 split into three
    parts (``k * P1`` exact while ``|k| < 2^16``, i.e. ``|u| < ~1e5``; RFF phases are O(1 / sigma)),
    then the Cephes single-precision minimax polynomials for sin and cos on [-pi/4, pi/4] (a few
    ulp), shared by both results.
    """
    k = tl.floor(u * 0.6366197723675814 + 0.5)
    r = u - k * 1.5703125
    r = r - k * 4.837512969970703125e-4
    r = r - k * 7.54978995489188216e-8
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = k.to(tl.int32) & 3
    # cos(k pi/2 + r) = cos r, -sin r, -cos r, sin r and sin(k pi/2 + r) = sin r, cos r, -sin r, -cos r
    # for k = 0, 1, 2, 3 (mod 4).
    odd = (quadrant & 1) == 1
    cos_u = tl.where(odd, sin_r, cos_r)
    sin_u = tl.where(odd, cos_r, sin_r)
    cos_u = tl.where((quadrant == 1) | (quadrant == 2), -cos_u, cos_u)
    sin_u = tl.where(quadrant >= 2, -sin_u, sin_u)
    return cos_u, sin_u


@triton.jit
def _schur_covariance_rff_feature_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    phi_ptr,
    N,
    d,
    m,
    stride_xn,
    stride_xd,
    stride_tn,
    stride_td,
    stride_wd,
    stride_wm,
    rff_scale,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """phi[s, r, f] = rff_scale * (cos u if f < m else sin u), u = z_r . W[:, f mod m], z = (x, t)[s].

    x, t: (N, d) in the input dtype (a row chunk); w: (d, m) fp32; phi: (2, N, 2m) contiguous, in the
    input dtype. Grid: (cdiv(N, BLOCK_N), cdiv(m, BLOCK_M), 2); program (r, c, s) computes one phase
    tile u = z[r-block] @ W[:, c-block] (a K loop over d) and stores its cosines and sines.
    """
    tl.static_assert(BLOCK_K >= 16)  # tl.dot needs K >= 16
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_M >= 16)
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    side = tl.program_id(2)
    z_is_t = side == 1
    z_ptr = tl.where(z_is_t, t_ptr, x_ptr)
    stride_zn = tl.where(z_is_t, stride_tn, stride_xn)
    stride_zd = tl.where(z_is_t, stride_td, stride_xd)

    rows = pid_r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    cols = pid_c * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    col_mask = cols < m
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    z_rows = z_ptr + rows[:, None] * stride_zn
    w_cols = w_ptr + cols[None, :] * stride_wm
    u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < d
        z = tl.load(z_rows + ks[None, :] * stride_zd, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wd, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        # 16-bit inputs: W rounded to the input dtype for the tensor cores (no-op for fp32).
        u = tl.dot(z, w.to(z.dtype), u, input_precision=INPUT_PRECISION)
    cos_u, sin_u = _cos_sin(u)
    F = 2 * m
    out = phi_ptr + side.to(tl.int64) * N * F + rows[:, None] * F + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out, (cos_u * rff_scale).to(phi_ptr.dtype.element_ty), mask=mask)
    tl.store(out + m, (sin_u * rff_scale).to(phi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _feature_tile(
    z_ptr,
    inv_ptr,
    rows,
    row_mask,
    feats,
    F,
    stride_zn,
    stride_zd,
    ROW_SCALE: tl.constexpr,
):
    """``phi(z[rows])[:, feats]``: (BLOCK_N, BLOCK_F), zero outside ``row_mask`` / ``feats < F``.

    ROW_SCALE 0 (column_cosine's raw rows; also the rff feature buffer) returns the loaded slice in the
    input dtype; 1 (row_cosine) returns fp32 and reads the row inverse norms ``inv_ptr`` (fp32).
    ``rows``/``feats`` are int64.
    """
    phi = tl.load(z_ptr + rows[:, None] * stride_zn + feats[None, :] * stride_zd,
                  mask=row_mask[:, None] & (feats < F)[None, :], other=0.0)
    if ROW_SCALE == 1:
        inv = tl.load(inv_ptr + rows, mask=row_mask, other=0.0)
        phi = phi.to(tl.float32) * inv[:, None]
    return phi


@triton.jit
def _operand(take_x, x_ptr, inv_x_ptr, stride_xn, stride_xd, t_ptr, inv_t_ptr, stride_tn, stride_td):
    """x's ``(pointer, row scales, row stride, column stride)`` when ``take_x``, else t's: one program picks
    its operands at run time, so a single launch covers every block or side."""
    return (tl.where(take_x, x_ptr, t_ptr), tl.where(take_x, inv_x_ptr, inv_t_ptr),
            tl.where(take_x, stride_xn, stride_tn), tl.where(take_x, stride_xd, stride_td))


@triton.jit
def _schur_covariance_gram_kernel(
    x_ptr,
    t_ptr,
    inv_x_ptr,
    inv_t_ptr,
    out_ptr,
    N,
    F,
    stride_xn,
    stride_xd,
    stride_tn,
    stride_td,
    blk,
    ROW_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[i, j] += sum_n phi(a_n)[i] phi(b_n)[j] for block blk: (a, b) = (t, t), (t, x), (x, x) for blk = 0, 1, 2.

    x, t: (N, F) in the input dtype (ROW_SCALE 0: the features; 1: the rows to normalise); out: (F, F)
    fp32 contiguous, this block's own tensor (one launch per block, so the three results never share
    storage), accumulated onto. Grid: (cdiv(F, BLOCK_F), cdiv(F, BLOCK_F)). Program (i, j) owns output
    tile (i, j); for the symmetric blocks (blk = 0, 2) tiles below the diagonal are written by the
    mirror program (j, i) and their own program exits at once.
    """
    tl.static_assert(BLOCK_N >= 16)  # tl.dot needs K >= 16
    tl.static_assert(BLOCK_F >= 16)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    symmetric = blk != 1
    if symmetric & (pid_i > pid_j):
        return
    # Operand a is text for S_tt / S_tx and image for S_xx; operand b is text only for S_tt.
    a_is_x = blk == 2
    b_is_x = blk != 0
    a_ptr, a_inv, stride_an, stride_ad = _operand(a_is_x, x_ptr, inv_x_ptr, stride_xn, stride_xd,
                                                  t_ptr, inv_t_ptr, stride_tn, stride_td)
    b_ptr, b_inv, stride_bn, stride_bd = _operand(b_is_x, x_ptr, inv_x_ptr, stride_xn, stride_xd,
                                                  t_ptr, inv_t_ptr, stride_tn, stride_td)

    feats_i = pid_i.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    feats_j = pid_j.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    mask = (feats_i < F)[:, None] & (feats_j < F)[None, :]
    tile = out_ptr + feats_i[:, None] * F + feats_j[None, :]
    acc = tl.load(tile, mask=mask, other=0.0)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        row_mask = rows < N
        fa = _feature_tile(a_ptr, a_inv, rows, row_mask, feats_i, F, stride_an, stride_ad, ROW_SCALE)
        fb = _feature_tile(b_ptr, b_inv, rows, row_mask, feats_j, F, stride_bn, stride_bd, ROW_SCALE)
        # 16-bit inputs: features rounded to the input dtype for the tensor cores (no-op for fp32).
        acc = tl.dot(tl.trans(fa.to(x_ptr.dtype.element_ty)), fb.to(x_ptr.dtype.element_ty), acc,
                     input_precision=INPUT_PRECISION)

    tl.store(tile, acc, mask=mask)
    # Mirror of an off-diagonal tile of a symmetric block (the diagonal tile is written once).
    mirror = symmetric & (pid_i < pid_j)
    tl.store(out_ptr + feats_j[None, :] * F + feats_i[:, None], acc, mask=mask & mirror)


@triton.jit
def _schur_covariance_grad_kernel(
    x_ptr,
    t_ptr,
    inv_x_ptr,
    inv_t_ptr,
    mat_ptr,
    out_ptr,
    N,
    F,
    stride_xn,
    stride_xd,
    stride_tn,
    stride_td,
    ROW_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[s, r, c] = sum_f phi(self_r)[f] mat[2s, f, c] + phi(other_r)[f] mat[2s+1, f, c].

    Side s = 0: self = x, other = t; s = 1: self = t, other = x. x, t: (N, F) (a row chunk of the
    inputs, or of the rff features; ROW_SCALE as in ``_schur_covariance_gram_kernel``); mat: (4, F, F) =
    [A_x, B_x, A_t, B_t] fp32 contiguous (pre-scaled by the launcher); out: (2, N, F) fp32 contiguous.
    Grid: (cdiv(N, BLOCK_N), cdiv(F, BLOCK_C), 2); program (r, c, s) owns out[s, r-block, c-chunk].
    """
    tl.static_assert(BLOCK_F >= 16)  # tl.dot needs K >= 16
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    side = tl.program_id(2)
    s_ptr, s_inv, stride_sn, stride_sd = _operand(side == 0, x_ptr, inv_x_ptr, stride_xn, stride_xd,
                                                  t_ptr, inv_t_ptr, stride_tn, stride_td)
    o_ptr, o_inv, stride_on, stride_od = _operand(side == 1, x_ptr, inv_x_ptr, stride_xn, stride_xd,
                                                  t_ptr, inv_t_ptr, stride_tn, stride_td)

    rows = pid_r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_mask = cols < F
    offs_f = tl.arange(0, BLOCK_F).to(tl.int64)
    a_base = mat_ptr + (2 * side).to(tl.int64) * F * F + cols[None, :]
    b_base = mat_ptr + (2 * side + 1).to(tl.int64) * F * F + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        feats = f0 + offs_f
        mat_mask = (feats < F)[:, None] & col_mask[None, :]
        ps = _feature_tile(s_ptr, s_inv, rows, row_mask, feats, F, stride_sn, stride_sd, ROW_SCALE)
        a = tl.load(a_base + feats[:, None] * F, mask=mat_mask, other=0.0)
        acc = tl.dot(ps.to(x_ptr.dtype.element_ty), a.to(x_ptr.dtype.element_ty), acc,
                     input_precision=INPUT_PRECISION)
        po = _feature_tile(o_ptr, o_inv, rows, row_mask, feats, F, stride_on, stride_od, ROW_SCALE)
        b = tl.load(b_base + feats[:, None] * F, mask=mat_mask, other=0.0)
        acc = tl.dot(po.to(x_ptr.dtype.element_ty), b.to(x_ptr.dtype.element_ty), acc,
                     input_precision=INPUT_PRECISION)

    out = out_ptr + side.to(tl.int64) * N * F
    tl.store(out + rows[:, None] * F + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


_INTERPRETED = is_interpreted(_schur_covariance_gram_kernel)


# --------------------------------------------------------------------------------------------
# Block-size policy
# --------------------------------------------------------------------------------------------


def kernel_configs(F: int, d: int, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """Launch configuration used for ``F`` features, input width ``d``, input ``dtype`` and fp32 dot
    ``precision`` ("ieee" or "tf32"; ignored for 16-bit inputs).

    Returns ``{"gram": {...}, "features": {...}, "grad": {...}}`` ("features": the rff feature kernel,
    for ``m = F // 2`` frequencies); each inner dict holds the kernel's block-size constexprs plus
    ``num_warps``/``num_stages``, exactly as the launchers pass them, so the AOT test compiles (and
    checks for spills and tensor-core instructions) what actually runs.

    Policy (fixed table, no ``triton.autotune``: that needs a GPU to benchmark), chosen by
    compiling for sm_80 / sm_90 and keeping tiles with no register spills:
    * Tensor-core dots (16-bit inputs, and fp32 with "tf32"): Gram tiles 64 x 64 over ``BLOCK_N`` = 32
      samples, 8 warps (128 x 128 tiles spilled on sm_80 and sm_90); gradient tiles 64 rows x 128
      columns contracting ``BLOCK_F`` = 32 features per step, 8 warps (tf32: 64 columns, 4 warps);
      rff phase tiles 64 rows x 64 frequencies over ``BLOCK_K`` = 32, 4 warps.
    * fp32 with "ieee": ``tl.dot`` lowers to FMA loops holding a thread's operand slices in registers,
      so the contraction sizes stay at 16: Gram tiles 64 x 64 over ``BLOCK_N`` = 16 samples on 8 warps,
      gradient tiles 64 x 64 with ``BLOCK_F`` = 16 on 4 warps, rff phase tiles 64 x 64 over
      ``BLOCK_K`` = 16 on 4 warps.
    * Small F / d / m: ``BLOCK_F``/``BLOCK_C``/``BLOCK_M``/``BLOCK_K`` shrink to the next power of two
      (at least 16, the ``tl.dot`` minimum) so no lanes are wasted on padding.
    * Every tile has at least 64 rows on 4 warps per warp group, so sm_90 runs ``wgmma``.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {_SUPPORTED_DTYPES}")
    if precision not in INPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {INPUT_PRECISIONS}, got {precision!r}")
    f_pow2 = max(triton.next_power_of_2(max(int(F), 1)), 16)
    m_pow2 = max(triton.next_power_of_2(max(int(F) // 2, 1)), 16)
    d_pow2 = max(triton.next_power_of_2(max(int(d), 1)), 16)
    if dtype == torch.float32 and precision == "ieee":
        gram = dict(BLOCK_N=16, BLOCK_F=min(f_pow2, 64), num_warps=8, num_stages=2)
        features = dict(BLOCK_N=64, BLOCK_M=min(m_pow2, 64), BLOCK_K=min(d_pow2, 16), num_warps=4, num_stages=2)
        grad = dict(BLOCK_N=64, BLOCK_C=min(f_pow2, 64), BLOCK_F=16, num_warps=4, num_stages=2)
    elif dtype == torch.float32:
        gram = dict(BLOCK_N=32, BLOCK_F=min(f_pow2, 64), num_warps=8, num_stages=2)
        features = dict(BLOCK_N=64, BLOCK_M=min(m_pow2, 64), BLOCK_K=min(d_pow2, 32), num_warps=4, num_stages=2)
        grad = dict(BLOCK_N=64, BLOCK_C=min(f_pow2, 64), BLOCK_F=32 if f_pow2 >= 32 else 16, num_warps=4,
                    num_stages=2)
    else:
        gram = dict(BLOCK_N=32, BLOCK_F=min(f_pow2, 64), num_warps=8, num_stages=2)
        features = dict(BLOCK_N=64, BLOCK_M=min(m_pow2, 64), BLOCK_K=min(d_pow2, 32), num_warps=4, num_stages=2)
        grad = dict(BLOCK_N=64, BLOCK_C=min(f_pow2, 128), BLOCK_F=32 if f_pow2 >= 32 else 16, num_warps=8,
                    num_stages=2)
    return {"gram": gram, "features": features, "grad": grad}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_launch(image, text, covariance, omegas, input_precision):
    """(F, m, fp32 omegas or None, dot precision) after checking the launch's invariants (see
    :mod:`clipfast.triton_kernels`): the shapes, dtypes and device the kernels index with."""
    check_tensor(image, "image", 2, _SUPPORTED_DTYPES)
    check_tensor(text, "text", 2, _SUPPORTED_DTYPES)
    torch._check(image.shape == text.shape and image.dtype == text.dtype,
                 lambda: f"image and text must have the same shape and dtype (paired rows), got {describe(image)} "
                         f"and {describe(text)}")
    torch._check(covariance in COVARIANCES, lambda: f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    rff = covariance == "rff"  # omegas is ignored by the cosine covariances
    d = image.shape[1]
    if rff:
        torch._check(isinstance(omegas, torch.Tensor) and omegas.ndim == 2 and omegas.shape[0] == d
                     and omegas.shape[1] >= 1 and omegas.dtype.is_floating_point,
                     lambda: f"covariance 'rff' needs omegas: a float (d, m) = ({d}, m >= 1) tensor, got "
                             f"{describe(omegas)}")
    check_launch_device(_INTERPRETED, image=image, text=text, omegas=omegas if rff else None)
    precision = resolve_input_precision(input_precision, image.dtype)
    if not rff:
        return d, 0, None, precision
    m = omegas.shape[1]
    return 2 * m, m, omegas.to(torch.float32), precision


def _inv_norms(z):
    """(n,) fp32 ``1 / max(||z_i||, 1e-12)`` (the torch prologue of "row_cosine") and the norms."""
    norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.float32)
    return 1.0 / norm.clamp_min(ROW_NORM_EPS), norm


def _row_chunk(n, F, block_n):
    """Rows per chunk: whole ``block_n`` blocks, about ``_CHUNK_ELEMS / F`` rows, at most n (rounded up)."""
    chunk = max(block_n, (_CHUNK_ELEMS // F) // block_n * block_n)
    return min(chunk, triton.cdiv(n, block_n) * block_n)


def _fill_rff_feature_buffer(x, t, w, phi, m, precision, cfg):
    """Fill ``phi: (2, rows, 2m)`` (input dtype, contiguous) with the rff features of the chunk ``x``, ``t``
    (``phi[0]`` the images', ``phi[1]`` the texts')."""
    rows, d = x.shape
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), 2)
    _schur_covariance_rff_feature_kernel[grid](
        x, t, w, phi, rows, d, m,
        x.stride(0), x.stride(1), t.stride(0), t.stride(1), w.stride(0), w.stride(1), 1.0 / math.sqrt(m),
        INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip


def _gram(x, t, inv_x, inv_t, out, row_scale, precision, cfg):
    """Add the three Gram blocks of the rows ``x``, ``t`` ((rows, F), ROW_SCALE ``row_scale``) onto ``out``."""
    rows, F = x.shape
    tiles = triton.cdiv(F, cfg["BLOCK_F"])
    for blk in range(3):
        _schur_covariance_gram_kernel[(tiles, tiles)](
            x, t, inv_x, inv_t, out[blk], rows, F, x.stride(0), x.stride(1), t.stride(0), t.stride(1), blk,
            ROW_SCALE=row_scale, INPUT_PRECISION=precision, **cfg,
        )  # fmt: skip


def schur_covariance_gram_triton(image, text, covariance, omegas=None, *, input_precision=None):
    """Feature Gram sums ``(S_tt, S_tx, S_xx)`` of paired rows.

    Args:
        image, text: (n, d) float32/float16/bfloat16 (same dtype, shape and device), any strides.
        covariance: "column_cosine", "row_cosine" or "rff".
        omegas: (d, m) float tensor on the same device (the RFF frequencies); required for
            "rff", ignored otherwise. Read in fp32.
        input_precision: "ieee", "tf32" or None (PyTorch's float32 matmul precision, read now); fp32 inputs only,
            16-bit always multiplies in its own dtype.

    Returns:
        Three (F, F) fp32 contiguous tensors (F = d, or 2m for "rff"); zeros when n == 0.
    """
    F, m, w, precision = _check_launch(image, text, covariance, omegas, input_precision)
    n, d = image.shape
    out = [torch.zeros((F, F), dtype=torch.float32, device=image.device) for _ in range(3)]
    if n == 0 or F == 0:
        return out[0], out[1], out[2]
    cfgs = kernel_configs(F, d, image.dtype, precision)
    if covariance == "row_cosine":
        _gram(image, text, *(_inv_norms(z)[0] for z in (image, text)), out, 1, precision, cfgs["gram"])
    elif covariance == "column_cosine":  # unused pointer slots get any valid tensor; ROW_SCALE=0 never reads them
        _gram(image, text, out[0], out[0], out, 0, precision, cfgs["gram"])
    else:
        chunk = _row_chunk(n, F, cfgs["features"]["BLOCK_N"])
        buf = torch.empty(2 * chunk * F, dtype=image.dtype, device=image.device)
        for r0 in range(0, n, chunk):
            x, t = image[r0:r0 + chunk], text[r0:r0 + chunk]
            phi = buf[: 2 * x.shape[0] * F].view(2, x.shape[0], F)
            _fill_rff_feature_buffer(x, t, w, phi, m, precision, cfgs["features"])
            _gram(phi[0], phi[1], out[0], out[0], out, 0, precision, cfgs["gram"])
    return out[0], out[1], out[2]


def _pow2_scale(mat):
    """A power of two close to max|mat| (1 for an all-zero or non-finite max), as a 0-d fp32 tensor on mat's
    device: dividing by it and multiplying back are exact, and it is never read on the host (no sync)."""
    peak = mat.abs().amax().to(torch.float64) if mat.numel() else mat.new_zeros((), dtype=torch.float64)
    usable = torch.isfinite(peak) & (peak > 0)
    exponent = torch.floor(torch.log2(torch.where(usable, peak, torch.ones_like(peak))))
    return torch.exp2(exponent).to(torch.float32)


def _grad_matrix(name, g, F, device):
    """``g`` in fp32, after checking the launch invariant that it is a float (F, F) tensor on ``device``."""
    torch._check(isinstance(g, torch.Tensor) and g.shape == (F, F) and g.dtype.is_floating_point and g.device == device,
                 lambda: f"{name} must be a float ({F}, {F}) tensor on {device}, got {describe(g)}")
    return g.to(torch.float32)


def _chain_rule(z, d_phi, covariance, w, phi):
    """dz (rows, d) fp32 from dPhi (rows, F) fp32 for a row chunk ``z`` (torch, see module docstring);
    ``phi``: the chunk's rff features (rows, 2m) for "rff", else unused."""
    if covariance == "column_cosine":
        return d_phi
    if covariance == "row_cosine":
        inv, norm = _inv_norms(z)
        phi = z.to(torch.float32) * inv[:, None]
        radial = (phi * d_phi).sum(1) * (norm > ROW_NORM_EPS)
        return (d_phi - phi * radial[:, None]) * inv[:, None]
    m = w.shape[1]
    phi = phi.to(torch.float32)
    du = phi[:, :m] * d_phi[:, m:] - phi[:, m:] * d_phi[:, :m]
    return du @ w.T


def schur_covariance_gram_backward_triton(grad_tt, grad_tx, grad_xx, image, text, covariance, omegas=None, *,
                                          input_precision=None):
    """Gradients of ``<G_tt, S_tt> + <G_tx, S_tx> + <G_xx, S_xx>`` w.r.t. ``image`` and ``text``.

    Args:
        grad_tt, grad_tx, grad_xx: (F, F) float tensors on the inputs' device (read in fp32).
        image, text, covariance, omegas, input_precision: as for :func:`schur_covariance_gram_triton`.

    Returns:
        (d_image, d_text): (n, d) each, in the input dtype (computed in fp32).
    """
    F, m, w, precision = _check_launch(image, text, covariance, omegas, input_precision)
    g_tt, g_tx, g_xx = (_grad_matrix(name, g, F, image.device)
                        for name, g in (("grad_tt", grad_tt), ("grad_tx", grad_tx), ("grad_xx", grad_xx)))
    n, d = image.shape
    d_image = torch.zeros_like(image, memory_format=torch.contiguous_format)
    d_text = torch.zeros_like(text, memory_format=torch.contiguous_format)
    if n == 0 or d == 0 or F == 0:
        return d_image, d_text
    mats = torch.stack([g_xx + g_xx.T, g_tx, g_tt + g_tt.T, g_tx.T])  # [A_x, B_x, A_t, B_t], contiguous
    # 16-bit inputs round the matrices for the tensor cores: scale them into [-2, 2) first.
    scale = _pow2_scale(mats)
    mats = mats / scale
    if covariance == "row_cosine":
        inv_x, inv_t = _inv_norms(image)[0], _inv_norms(text)[0]
    else:
        inv_x = inv_t = mats
    if w is None:
        w = mats
    cfgs = kernel_configs(F, d, image.dtype, precision)
    cfg = cfgs["grad"]
    chunk = _row_chunk(n, F, cfg["BLOCK_N"])
    buf = torch.empty(2 * chunk * F, dtype=torch.float32, device=image.device)
    rff = covariance == "rff"
    features = torch.empty(2 * chunk * F, dtype=image.dtype, device=image.device) if rff else None
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        x, t, rows = image[r0:r1], text[r0:r1], r1 - r0
        out = buf[: 2 * rows * F].view(2, rows, F)  # contiguous, as the kernel requires
        if rff:  # the kernel reads the chunk's features as they are
            phi = features[: 2 * rows * F].view(2, rows, F)
            _fill_rff_feature_buffer(x, t, w, phi, m, precision, cfgs["features"])
            a_x, a_t, a_inv_x, a_inv_t = phi[0], phi[1], mats, mats
        else:
            a_x, a_t = x, t
            a_inv_x, a_inv_t = (inv_x[r0:r1], inv_t[r0:r1]) if covariance == "row_cosine" else (inv_x, inv_t)
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(F, cfg["BLOCK_C"]), 2)
        _schur_covariance_grad_kernel[grid](
            a_x, a_t, a_inv_x, a_inv_t, mats, out, rows, F,
            a_x.stride(0), a_x.stride(1), a_t.stride(0), a_t.stride(1),
            ROW_SCALE=ROW_SCALE[covariance], INPUT_PRECISION=precision, **cfg,
        )  # fmt: skip
        out = out * scale
        d_image[r0:r1] = _chain_rule(x, out[0], covariance, w, phi[0] if rff else None)
        d_text[r0:r1] = _chain_rule(t, out[1], covariance, w, phi[1] if rff else None)
    return d_image, d_text
