"""Triton kernels for CLIP-style contrastive (softmax) and SigLIP (sigmoid) losses.

Notation: ``x: (N, D)`` and ``y: (M, D)`` are the two embedding batches (same float dtype),
``scale`` and ``bias`` are 0-d or ``[1]``-shaped device tensors, and the logits are

    S = scale * x @ y.T                                     (N, M), never materialised.

Algorithm
---------
* Forward reductions. A program owns ``BLOCK_M`` rows of ``x`` and sweeps ``y`` in column
  tiles of ``BLOCK_N``; each ``(BLOCK_M, BLOCK_N)`` logit tile is produced by a K-loop over
  ``D`` in ``BLOCK_K`` chunks (``tl.dot``, fp32 accumulation) and folded at once into a
  per-row running statistic:
    - softmax (``SIGMOID=False``): online log-sum-exp, i.e. running max ``m`` and running
      ``sum exp(S - m)`` rescaled whenever ``m`` grows, as in FlashAttention
      (Dao et al., arXiv:2205.14135) and Inf-CL (Cheng et al., arXiv:2410.17243);
    - sigmoid (``SIGMOID=True``): running ``sum_j softplus(S_ij + bias)``.
  Column statistics (``logsumexp`` over ``i``) reuse the same kernel with ``x`` and ``y``
  swapped, because ``S.T = scale * y @ x.T``.
* Backward. ``G = dF/dS`` for F = row_weight * sum_i row_lse_i + col_weight * sum_j col_lse_j
  (softmax: G_ij = row_weight * exp(S_ij - row_lse_i) + col_weight * exp(S_ij - col_lse_j))
  or F = sum_ij softplus(S_ij + bias) (sigmoid: G = sigmoid(S + bias)). A program owns a row
  block and sweeps the column tiles: it recomputes each logit tile once from x and y, forms
  that G tile in registers from the saved LSE vectors and contracts it at once with the
  matching rows of y, chunk by chunk over D, adding into the program's own gradient rows
  (``grad_x = G @ y``); launching the same kernel with the roles of x and y swapped gives
  ``grad_y = G.T @ x``. (dF/dx = scale * grad_x: the caller applies ``scale`` and any
  loss-specific terms.) The softmax launcher can contract G with other values instead,
  ``G @ y_values`` (N, E) and ``G.T @ x_values`` (M, E) of any width E: G still comes from
  x and y, the values only enter the second GEMM (distillation: a teacher's G, a student's
  features).
* Work, in N x M x D GEMM-equivalents (2·N·M·D flops each) for one forward + backward, any
  D (the block sizes only tile it): the row reduction is 1, a gradient launch 2 (the logit
  recompute and G @ y; 1 + E / D with values of width E). Softmax InfoNCE: 2 (row and
  column LSE) + 2 x 2 = 6; SigLIP: 1 + 2 x 2 = 5. ``tests/ops/test_contrastive_triton_work.py``
  counts every executed ``tl.dot`` under the interpreter and holds these numbers, values
  included. (The previous design split D over a second grid axis and recomputed the logit
  tile once per D chunk: 12-20 fp32 and 8-12 bf16 GEMM-equivalents for the symmetric loss
  at D = 512-1024.)
* Precision. 16-bit inputs multiply on tensor cores (mma.sync on sm_80, wgmma on sm_90)
  with fp32 accumulation, and G is rounded to the input dtype for its GEMM. fp32 inputs take
  ``input_precision`` from the caller, which follows PyTorch's float32 matmul precision
  (``clipfast.backends.triton_input_precision``): "ieee" = exact fp32 on FMA units, "tf32" =
  tensor cores with operands rounded to a 10-bit mantissa.
* Determinism. Every output element (LSE entry, softplus sum, gradient row chunk) is owned
  by exactly one program and accumulated in a fixed loop order: no atomics, so results are
  bitwise reproducible run to run.
* Memory. The N x M logit / probability matrices exist only as on-chip tiles of
  BLOCK_M x BLOCK_N; the only extra global memory beyond the inputs and gradients is
  O(N + M) (the LSE / row-sum vectors), against O(N M) for a materialised implementation.

References: CLIP (Radford et al., arXiv:2103.00020); SigLIP (Zhai et al., arXiv:2303.15343);
FlashAttention (arXiv:2205.14135); Inf-CL (arXiv:2410.17243).

All launchers accept CUDA tensors, or CPU tensors when Triton runs under its interpreter
(``TRITON_INTERPRET=1`` set before this module is imported). Inputs may be float32, float16
or bfloat16 with arbitrary strides; outputs are float32. ``scale``/``bias`` are read by the
kernels through a pointer, so no host synchronisation happens.
"""

import torch
import triton
import triton.language as tl

from clipfast.triton_kernels import (INPUT_PRECISIONS, check_launch_device, describe, is_interpreted,
                                     resolve_input_precision)

__all__ = [
    "contrastive_grad_triton",
    "contrastive_lse_triton",
    "kernel_configs",
    "siglip_grad_triton",
    "siglip_softplus_triton",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    x_ptr,
    y_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_xn,
    stride_xd,
    stride_yn,
    stride_yd,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Unscaled logit tile ``x[rows] @ y[cols].T``: (BLOCK_M, BLOCK_N) fp32.

    ``rows``/``cols`` are int64 so that ``index * stride`` cannot overflow 32 bits. Masked
    rows/columns load zeros, so their logits are exactly 0 and callers mask them afterwards.
    """
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xn
    y_cols = y_ptr + cols[None, :] * stride_yn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < D
        x_tile = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        y_tile = tl.load(y_cols + ks[:, None] * stride_yd, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x_tile, y_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _softplus(z):
    """Stable softplus(z) = max(z, 0) + log1p(exp(-|z|)) in fp32.

    Triton's core language has no log1p, and log(1 + t) loses all relative accuracy once
    t = exp(-|z|) drops below fp32 epsilon (|z| > ~16), exactly the regime of SigLIP's
    negative pairs with bias = -10. Goldberg's identity log1p(t) = log(u) * t / (u - 1),
    u = 1 + t, cancels the rounding of u and is accurate to a few ulp; when u rounds to 1,
    log1p(t) = t to working precision.
    """
    t = tl.exp(-tl.abs(z))
    u = 1.0 + t
    um1 = u - 1.0
    log1p_t = tl.where(um1 == 0.0, t, tl.log(u) * (t / tl.where(um1 == 0.0, 1.0, um1)))
    return tl.maximum(z, 0.0) + log1p_t


@triton.jit
def _contrastive_row_reduce_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_xn,
    stride_xd,
    stride_yn,
    stride_yd,
    SIGMOID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[i] = logsumexp_j S_ij (SIGMOID=False) or sum_j softplus(S_ij + bias) (SIGMOID=True).

    x: (N, D), y: (M, D), out: (N,) fp32 contiguous. Grid: (cdiv(N, BLOCK_M),).
    ``bias_ptr`` is only read when SIGMOID. Requires M >= 1 (the launcher handles M == 0).

    exp uses tl.exp: for fp32 the NVIDIA backend already lowers it to a log2(e) multiply plus
    ex2.approx, so pre-scaling by log2(e) by hand would save nothing worth the base-2
    bookkeeping in the natural-log LSE outputs.
    """
    tl.static_assert(BLOCK_K >= 16)  # tl.dot needs K >= 16
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)

    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for n0 in range(0, M, BLOCK_N):
        cols = n0 + offs_n
        col_mask = cols < M
        s = _logit_tile(x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, stride_xn, stride_xd, stride_yn,
                        stride_yd, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K) * scale
        if SIGMOID:
            acc += tl.sum(tl.where(col_mask[None, :], _softplus(s + bias), 0.0), axis=1)
        else:
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row whose max is still -inf (only reachable through -inf logits) would give
            # (-inf) - (-inf) = NaN below; shifting by 0 instead keeps exp() at exactly 0.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_shift) + tl.sum(tl.exp(s - m_shift[:, None]), axis=1)
            m_i = m_new

    if SIGMOID:
        out = acc
    else:
        out = m_i + tl.log(l_i)
    tl.store(out_ptr + rows, out, mask=row_mask)


@triton.jit
def _contrastive_grad_kernel(
    x_ptr,
    y_ptr,
    v_ptr,
    scale_ptr,
    bias_ptr,
    row_lse_ptr,
    col_lse_ptr,
    grad_ptr,
    row_sum_ptr,
    N,
    M,
    D,
    E,
    stride_xn,
    stride_xd,
    stride_yn,
    stride_yd,
    stride_vn,
    stride_ve,
    stride_gn,
    stride_ge,
    row_weight,
    col_weight,
    SIGMOID: tl.constexpr,
    ROW_TERM: tl.constexpr,
    COL_TERM: tl.constexpr,
    WRITE_ROW_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad[i, :] += sum_j G_ij v[j, :] over all j; optionally row_sum[i] = sum_j G_ij.

    x: (N, D), y: (M, D) build the logits S = scale * x @ y.T; v: (M, E), the values G is
    contracted with (y itself, E = D, for the gradient of the loss in x; another width for
    distillation), same dtype as x and y. grad: (N, E) fp32, zero-filled by the launcher;
    row_sum: (N,) fp32.
    SIGMOID=False: G_ij = row_weight * exp(S_ij - row_lse[i]) [ROW_TERM]
                        + col_weight * exp(S_ij - col_lse[j]) [COL_TERM].
    SIGMOID=True:  G_ij = sigmoid(S_ij + bias).
    Grid: (cdiv(N, BLOCK_M),); program r owns the gradient rows of its row block, all of E.
    ``BLOCK_K`` tiles D (the logit GEMM), ``BLOCK_D`` tiles E (the contraction G @ v).

    Work: each logit tile is computed exactly once (one N x M x D GEMM over the grid) and
    contracted at once with v in E-chunks of BLOCK_D (one N x M x E GEMM), so one launch is
    1 + E / D N x M x D GEMM-equivalents (two when v = y) for every D. The (BLOCK_M, E) fp32
    gradient block cannot live in registers for E up to 1280, so it accumulates in global
    memory: each column tile adds its contribution chunk by chunk (load, tl.dot, store). Only
    this program touches those rows, and it visits the column tiles in a fixed order, so the
    result is deterministic. The block (BLOCK_M * E * 4 bytes, 256 KiB at E = 1024) is
    re-read while it is hot, from L2; per column tile the read-modify-write moves
    8 * BLOCK_M * E bytes against 2 * BLOCK_M * BLOCK_N * (D + E) flops (logit tile and
    G @ v), i.e. BLOCK_N * (D + E) / (4 * E) flops per byte of L2 traffic (BLOCK_N / 2 when
    v = y).
    """
    tl.static_assert(BLOCK_K >= 16)  # tl.dot needs K >= 16
    tl.static_assert(BLOCK_N >= 16)  # ... and the column tile is the K of G @ v
    pid_m = tl.program_id(0).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_D).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    grad_rows = grad_ptr + rows[:, None] * stride_gn

    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
        if WRITE_ROW_SUM:
            g_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    elif ROW_TERM:
        row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)

    for n0 in range(0, M, BLOCK_N):
        cols = n0 + offs_n
        col_mask = cols < M
        s = _logit_tile(x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, stride_xn, stride_xd, stride_yn,
                        stride_yd, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K) * scale
        if SIGMOID:
            g = tl.sigmoid(s + bias)
        else:
            g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if ROW_TERM:
                g += row_weight * tl.exp(s - row_lse[:, None])
            if COL_TERM:
                col_lse = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0)
                g += col_weight * tl.exp(s - col_lse[None, :])
        # Padding columns must contribute nothing, neither to the row sum nor (0 * inf) to grad.
        g = tl.where(col_mask[None, :], g, 0.0)
        if SIGMOID and WRITE_ROW_SUM:
            g_sum += tl.sum(g, axis=1)
        # Rounding G to the values' dtype lets the second GEMM run on 16-bit tensor cores, as
        # FlashAttention does with P. The launcher keeps G within [0, 2] (weights normalised,
        # undone afterwards) so fp16 does not flush it to zero. No-op for fp32 inputs.
        g = g.to(v_ptr.dtype.element_ty)
        v_rows = v_ptr + cols[:, None] * stride_vn
        for e0 in range(0, E, BLOCK_D):
            ee = e0 + offs_e
            e_mask = ee < E
            v_chunk = tl.load(v_rows + ee[None, :] * stride_ve, mask=col_mask[:, None] & e_mask[None, :], other=0.0)
            out_mask = row_mask[:, None] & e_mask[None, :]
            grad_chunk = grad_rows + ee[None, :] * stride_ge
            acc = tl.load(grad_chunk, mask=out_mask, other=0.0)
            acc = tl.dot(g, v_chunk, acc, input_precision=INPUT_PRECISION)
            tl.store(grad_chunk, acc, mask=out_mask)

    if SIGMOID and WRITE_ROW_SUM:
        tl.store(row_sum_ptr + rows, g_sum, mask=row_mask)


_INTERPRETED = is_interpreted(_contrastive_row_reduce_kernel)


# --------------------------------------------------------------------------------------------
# Block-size policy
# --------------------------------------------------------------------------------------------


def kernel_configs(D: int, dtype: torch.dtype, precision: str = "ieee", *, E=None) -> dict:
    """Launch configuration used for feature dimension ``D``, input ``dtype``, fp32 ``precision`` and
    value width ``E`` (the width of the values the gradient contracts G with; None: ``E = D``, the
    plain gradient).

    Returns ``{"row_reduce": {...}, "grad": {...}}``; each inner dict holds the kernel's
    block-size constexprs plus ``num_warps``/``num_stages``, exactly as the launchers pass
    them, so the AOT test compiles (and checks for spills and tensor-core instructions) what
    actually runs.

    Policy (fixed table, no ``triton.autotune``: that needs a GPU to benchmark). Sizes were
    chosen by compiling for sm_80 and sm_90 and keeping large tiles with no register spills
    (STACK 0) and shared memory within the sm_80 limit:
    * 16-bit inputs (tensor cores: mma.sync on sm_80, wgmma on sm_90): ``BLOCK_K`` = 64
      elements = one 128 B line per row. The row reduction uses 128 x 64 logit tiles on 8
      warps with 3 pipeline stages (~125 registers, two programs per SM). The gradient uses
      64 x 128 logit tiles, contracted with the values in 128-wide E chunks (~195 registers):
      the wide column tile halves the gradient block's L2 read-modify-write per flop (see
      ``_contrastive_grad_kernel``).
    * fp32 with ``precision="tf32"`` (tensor cores on fp32 operands): the same shapes with
      ``BLOCK_K`` = 32 (the same 128 B per row) and 64 x 64 gradient tiles.
    * fp32 with ``precision="ieee"`` (exact fp32, no tensor cores): ``tl.dot`` lowers to FMA
      loops that hold a thread's whole operand slices in registers, so K stays small:
      ``BLOCK_K`` = 16 for the logit GEMM and ``BLOCK_N`` = 32 for the gradient, whose
      ``G @ v`` contracts over the column tile.
    * Each width picks its own tile: ``BLOCK_K`` tiles only D (the logit K-loop) and
      ``BLOCK_D`` only E (the output chunk of ``G @ v``), so ``BLOCK_K`` comes from D and
      ``BLOCK_D`` from E. Small widths shrink them to the next power of two of the width (at
      least 16, the ``tl.dot`` minimum) so no lanes are wasted on padding.
    * Narrow values under a full logit tile (a distillation student narrower than 128 against
      a wide teacher): on sm_80 ptxas caps some of these 8-warp kernels at 128 registers and
      spills 8-24 bytes. Compiled with a full ``BLOCK_K``, the 16-bit kernels spill with
      16-wide value chunks and the tf32 ones with 64-wide chunks (32 and 128 are clean in
      both), so the 16-bit ``BLOCK_D`` is at least 32 (E <= 16 is padded to 32) and tf32
      covers E in (32, 64] with two 32-wide chunks (the same work, no padding).
      With these the softmax gradient compiles without spills for every (D, E) in fp32 (exact
      and tf32), and in 16-bit wherever ``BLOCK_K`` is full (D > 32). Tiny teachers (D <= 32)
      keep a few 8-byte spills on sm_80, as small D did before values existed (16-bit softmax,
      exact-fp32 sigmoid at D = 32).
    Apart from the padding of ragged tiles the block sizes never change the work: every launch
    is one (row reduction) or 1 + E / D (gradient; two when E = D) N x M x D GEMM-equivalents.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {_SUPPORTED_DTYPES}")
    if precision not in INPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {INPUT_PRECISIONS}, got {precision!r}")
    d_pow2 = max(triton.next_power_of_2(max(int(D), 1)), 16)
    e_pow2 = d_pow2 if E is None else max(triton.next_power_of_2(max(int(E), 1)), 16)
    block_d = min(e_pow2, 128)
    if dtype != torch.float32:
        block_k = min(d_pow2, 64)
        block_d = max(block_d, 32)  # 16-wide value chunks spill on sm_80 (docstring)
        row = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k, num_warps=8, num_stages=3)
        grad = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8, num_stages=2)
    elif precision == "tf32":
        block_k = min(d_pow2, 32)
        block_d = 32 if block_d == 64 else block_d  # 64-wide value chunks spill on sm_80 (docstring)
        row = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k, num_warps=8, num_stages=3)
        grad = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8, num_stages=2)
    else:
        block_k = min(d_pow2, 16)
        row = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, num_warps=8, num_stages=3)
        grad = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return {"row_reduce": row, "grad": grad}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_launch(x, y, *scalars):
    """The launch's invariants: (N, D) and (M, D) features of one supported dtype on one device this Triton
    can run on, one-element float scalars there. User arguments are validated once, by clipfast.functional
    and the registered ops (clipfast/ops/contrastive.py); this only guards direct callers of the launchers
    against out-of-bounds reads, with RuntimeError (``torch._check``)."""
    torch._check(x.ndim == 2 and y.ndim == 2 and x.shape[1] == y.shape[1],
                 lambda: f"x and y must be (rows, D) with one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    torch._check(x.dtype == y.dtype and x.dtype in _SUPPORTED_DTYPES,
                 lambda: f"x and y must share one of {_SUPPORTED_DTYPES}, got {x.dtype} and {y.dtype}")
    check_launch_device(_INTERPRETED, x=x, y=y)
    for t in scalars:
        torch._check(t.numel() == 1 and t.ndim <= 1 and t.dtype.is_floating_point and t.device == x.device,
                     lambda: f"scale and bias must be one-element float tensors on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def _check_values(x, y, x_values, y_values):
    """The values the gradients contract G with, ``(x_values, y_values)``: x and y themselves when both are None.

    The launch's invariants, in the style of :func:`_check_launch` (RuntimeError): both given or both None;
    ``(N, E)`` and ``(M, E)`` with the rows of x and y and one E; the dtype of x, on its device."""
    torch._check((x_values is None) == (y_values is None),
                 lambda: f"x_values and y_values must be given together, got {describe(x_values)} and "
                         f"{describe(y_values)}")
    if x_values is None:
        return x, y

    def check_rows(name, values, rows):
        torch._check(isinstance(values, torch.Tensor) and values.ndim == 2 and values.shape[0] == rows,
                     lambda: f"{name} must be ({rows}, E), got {describe(values)}")
        torch._check(values.dtype == x.dtype, lambda: f"{name} must be {x.dtype} like x, got {values.dtype}")

    check_rows("x_values", x_values, x.shape[0])
    check_rows("y_values", y_values, y.shape[0])
    torch._check(x_values.shape[1] == y_values.shape[1],
                 lambda: f"x_values and y_values must be (rows, E) with one E, got {tuple(x_values.shape)} and "
                         f"{tuple(y_values.shape)}")
    check_launch_device(_INTERPRETED, x=x, x_values=x_values, y_values=y_values)
    return x_values, y_values


def _row_reduce(x, y, scale, bias, sigmoid, precision):
    """Launch the row kernel: (N,) fp32. Requires N >= 1 and M >= 1."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    cfg = kernel_configs(x.shape[1], x.dtype, precision)["row_reduce"]
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_M"]),)
    _contrastive_row_reduce_kernel[grid](
        x, y, scale, bias, out,
        x.shape[0], y.shape[0], x.shape[1],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        SIGMOID=sigmoid, INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    return out


def _grad(x, y, scale, bias, row_lse, col_lse, row_weight, col_weight, sigmoid, write_row_sum, precision,
          values=None):
    """Launch the grad kernel for ``G @ values``, G built from ``x`` (N, D) and ``y`` (M, D): ((N, E) fp32,
    (N,) fp32 row sum or None). ``values`` is (M, E), the dtype of x; None: ``y`` (the gradient w.r.t. x).

    Requires N >= 1 and M >= 1. ``row_lse``/``col_lse`` are None when their term is absent.
    """
    values = y if values is None else values
    n, d = x.shape
    e = values.shape[1]
    # G = weight * probability would underflow in fp16 for the usual weights ~1/N (fp16's
    # smallest subnormal is 6e-8), so the kernel contracts G / w_max, in [0, 2], and scales
    # the fp32 accumulator back by w_max.
    out_scale = max((abs(float(w)) for w, lse in ((row_weight, row_lse), (col_weight, col_lse)) if lse is not None),
                    default=1.0)
    grad = torch.zeros((n, e), dtype=torch.float32, device=x.device)  # the kernel accumulates into it
    row_sum = torch.empty(n, dtype=torch.float32, device=x.device) if write_row_sum else grad
    cfg = kernel_configs(d, x.dtype, precision, E=e)["grad"]
    # Unused pointer slots get any valid tensor; constexpr flags keep the kernel from reading them.
    _contrastive_grad_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        x, y, values, scale, bias,
        row_lse if row_lse is not None else scale,
        col_lse if col_lse is not None else scale,
        grad, row_sum,
        n, y.shape[0], d, e,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), values.stride(0), values.stride(1),
        grad.stride(0), grad.stride(1),
        float(row_weight) / out_scale, float(col_weight) / out_scale,
        SIGMOID=sigmoid, ROW_TERM=row_lse is not None, COL_TERM=col_lse is not None,
        WRITE_ROW_SUM=write_row_sum, INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    if out_scale != 1.0:
        grad.mul_(out_scale)
    return grad, (row_sum if write_row_sum else None)


def contrastive_lse_triton(x, y, scale, with_cols, *, input_precision=None):
    """Row (and optionally column) log-sum-exp of the scaled logits.

    Args:
        x: (N, D) float32/float16/bfloat16, any strides.
        y: (M, D) same dtype and device as x.
        scale: 0-d or [1]-shaped float tensor on the same device; S = scale * x @ y.T.
        with_cols: also compute the column LSE.
        input_precision: "ieee", "tf32" or None (PyTorch's float32 matmul precision, read now); fp32 inputs only,
            16-bit always multiplies in its own dtype.

    Returns:
        row_lse: (N,) fp32, row_lse[i] = logsumexp_j S_ij (-inf when M == 0).
        col_lse: (M,) fp32, col_lse[j] = logsumexp_i S_ij (-inf when N == 0), or an empty
            fp32 tensor when ``with_cols`` is false.
    """
    _check_launch(x, y, scale)
    precision = resolve_input_precision(input_precision, x.dtype)
    n, m = x.shape[0], y.shape[0]
    empty = torch.empty(0, dtype=torch.float32, device=x.device)
    if n == 0 or m == 0:
        row_lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
        col_lse = torch.full((m,), float("-inf"), dtype=torch.float32, device=x.device) if with_cols else empty
        return row_lse, col_lse
    row_lse = _row_reduce(x, y, scale, scale, False, precision)
    col_lse = _row_reduce(y, x, scale, scale, False, precision) if with_cols else empty
    return row_lse, col_lse


def _lse_term(lse, length, weight, device):
    """The contiguous LSE vector, or None when its term is absent (empty, or weight 0)."""
    if lse.numel() == 0 or weight == 0:
        return None
    torch._check(lse.shape == (length,) and lse.dtype == torch.float32 and lse.device == device,
                 lambda: f"an LSE term must be float32 of shape ({length},) on {device} or empty, got {lse.dtype} "
                         f"{tuple(lse.shape)} on {lse.device}")
    return lse.contiguous()


def contrastive_grad_triton(x, y, scale, row_lse, col_lse, row_weight: float, col_weight: float,
                            x_values=None, y_values=None, *, input_precision=None):
    """The softmax-CE logits' G contracted with the features, or with other values.

    With S = scale * x @ y.T (N, M),
        G_ij = row_weight * exp(S_ij - row_lse[i]) + col_weight * exp(S_ij - col_lse[j]),
    returns ``grad_x = G @ y_values`` (N, E) fp32 and ``grad_y = G.T @ x_values`` (M, E) fp32;
    without values, ``G @ y`` (N, D) and ``G.T @ x`` (M, D). A term is absent when its weight
    is 0 or its LSE tensor is empty. The values only enter the products: for distillation G is
    a teacher's softmax (x, y its features, width D) and the values a student's (width E).

    Args:
        x: (N, D), y: (M, D) float32/float16/bfloat16 (same dtype/device), any strides.
        scale: 0-d or [1]-shaped float tensor on the same device.
        row_lse: (N,) fp32 (or empty), col_lse: (M,) fp32 (or empty), as from
            :func:`contrastive_lse_triton`.
        row_weight, col_weight: Python floats (host values, no sync).
        x_values: (N, E), y_values: (M, E), the dtype and device of x, any strides, E may differ
            from D; both given or both None (then x and y, E = D).
        input_precision: "ieee", "tf32" or None (PyTorch's float32 matmul precision); fp32 inputs only.
    """
    _check_launch(x, y, scale)
    x_values, y_values = _check_values(x, y, x_values, y_values)
    precision = resolve_input_precision(input_precision, x.dtype)
    n, m, e = x.shape[0], y.shape[0], x_values.shape[1]
    row_lse = _lse_term(row_lse, n, row_weight, x.device)
    col_lse = _lse_term(col_lse, m, col_weight, x.device)
    if n == 0 or m == 0 or (row_lse is None and col_lse is None):
        return (torch.zeros((n, e), dtype=torch.float32, device=x.device),
                torch.zeros((m, e), dtype=torch.float32, device=x.device))
    grad_x, _ = _grad(x, y, scale, scale, row_lse, col_lse, row_weight, col_weight, False, False, precision,
                      values=y_values)
    # G.T has the roles of rows and columns (and of their LSEs, weights and values) exchanged.
    grad_y, _ = _grad(y, x, scale, scale, col_lse, row_lse, col_weight, row_weight, False, False, precision,
                      values=x_values)
    return grad_x, grad_y


def siglip_softplus_triton(x, y, scale, bias, *, input_precision=None):
    """Row sums of softplus of the SigLIP logits.

    Args:
        x: (N, D), y: (M, D) float32/float16/bfloat16 (same dtype/device), any strides.
        scale, bias: 0-d or [1]-shaped float tensors on the same device.
        input_precision: "ieee", "tf32" or None (PyTorch's float32 matmul precision); fp32 inputs only.

    Returns:
        row_sum: (N,) fp32, row_sum[i] = sum_j softplus(scale * x_i . y_j + bias)
        (0 when M == 0).
    """
    _check_launch(x, y, scale, bias)
    precision = resolve_input_precision(input_precision, x.dtype)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return _row_reduce(x, y, scale, bias, True, precision)


def siglip_grad_triton(x, y, scale, bias, *, input_precision=None):
    """Sigmoid of the SigLIP logits contracted with the features.

    With G = sigmoid(scale * x @ y.T + bias) (N, M), returns ``grad_x = G @ y`` (N, D),
    ``grad_y = G.T @ x`` (M, D) and ``grad_row_sum = G.sum(1)`` (N,), all fp32.

    Args:
        x: (N, D), y: (M, D) float32/float16/bfloat16 (same dtype/device), any strides.
        scale, bias: 0-d or [1]-shaped float tensors on the same device.
        input_precision: "ieee", "tf32" or None (PyTorch's float32 matmul precision); fp32 inputs only.
    """
    _check_launch(x, y, scale, bias)
    precision = resolve_input_precision(input_precision, x.dtype)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return (torch.zeros(x.shape, dtype=torch.float32, device=x.device),
                torch.zeros(y.shape, dtype=torch.float32, device=x.device),
                torch.zeros(x.shape[0], dtype=torch.float32, device=x.device))
    grad_x, row_sum = _grad(x, y, scale, bias, None, None, 1.0, 0.0, True, True, precision)
    # sigmoid(S.T + bias) = G.T: the swapped launch needs no column sums.
    grad_y, _ = _grad(y, x, scale, bias, None, None, 1.0, 0.0, True, False, precision)
    return grad_x, grad_y, row_sum
