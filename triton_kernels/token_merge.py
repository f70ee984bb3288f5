"""Triton kernels for token merging (ToMe): bipartite soft matching, the size-weighted merge and its backward.

Spec: :mod:`clipfast.reference.token_merge`. ``metric: (B, N, C)``, ``x: (B, N, D)``, ``size: (B, N)``
(optional), ``dest: (B, N)`` int64 (every token's output row), N' = N - r' output rows. A = tokens at even
positions (``num_a = ceil(N / 2)``), B = odd positions (``num_b = floor(N / 2)``); the first ``ceil(P / 2)``
A and ``floor(P / 2)`` B tokens are the P protected prefix tokens.

Algorithm
---------
* ``_best_partner_kernel``, grid ``(B, cdiv(num_a, BLOCK_A))``: a block of A rows against the non-prefix B
  rows in ``BLOCK_B`` tiles, ``tl.dot`` over C in ``BLOCK_C`` chunks (tensor cores for 16-bit metrics, fp32
  by PyTorch's matmul precision), the cosine ``<m_a, m_b> / (max(|m_a|, eps) max(|m_b|, eps))``, and a running
  row maximum whose argmax keeps the lower B on ties (strict > across tiles, the first maximum within one).
  Writes ``best (B, num_a)`` fp32 (-inf for protected A) and ``partner (B, num_a)`` int32 to scratch.
  Work: ``num_a num_b C`` multiply-adds per row, ToMe's one small GEMM.
* ``_dest_kernel``, grid ``(B,)``: A token a's rank in the stable descending order of ``best`` is
  ``#{a' : best_a' > best_a} + #{a' < a : best_a' == best_a}`` (``(BLOCK_I, BLOCK_J)`` comparison tiles,
  O(num_a^2)); rank < r' is merged into its partner's row. Walking the A tokens in ascending order with a
  running count of the kept ones (an inclusive ``tl.cumsum`` per tile) gives ToMe's output rows with no
  sort; B rows are a closed formula.
* ``_sources_kernel``, grid ``(B,)``: the inverse of dest as a CSR, every output row's sources in ascending
  order: ``offsets[o]`` = the exclusive prefix sum of the source counts, and token i's slot = ``offsets[dest_i]
  + #{i' < i : dest_i' = dest_i}`` (O(N^2) equality tests per row in tiles; a few hundred thousand for a ViT).
* ``_reduce_kernel``, grid ``(B, cdiv(N', BLOCK_R), cdiv(D, BLOCK_D))``: each program owns ``BLOCK_R``
  output rows x ``BLOCK_D`` columns and adds ``size_i x_i`` over its rows' sources in ascending order (the
  longest source list of the block bounds the loop), then divides by the summed sizes: every output element
  is written once, by one program (no scatter, no atomics), in fp32.
* ``_reduce_backward_kernel``, grid ``(B, cdiv(N, BLOCK_R), cdiv(D, BLOCK_D))``: ``grad_x[i] = size_i /
  merged_size[dest_i] * grad_merged[dest_i]``, a row gather.

dest is trusted to come from the match (checking it would synchronise with the host): an out-of-range entry
never causes an out-of-bounds access (its rows read zero), and an output row without a source divides zero by
zero (NaN). Determinism: every output element is owned by one program and computed in a fixed order; results
are bitwise reproducible run to run. Index arithmetic on tensors is 64-bit.

All launchers accept CUDA tensors, or CPU tensors when Triton runs under its interpreter (``TRITON_INTERPRET=1``
set before this module is imported). Tokens and metrics may be float32, float16 or bfloat16, with arbitrary
strides; sizes are float32.
"""

import torch
import triton
import triton.language as tl

from clipfast.reference.token_merge import METRIC_NORM_EPS, merge_count
from clipfast.triton_kernels import (check_int, check_launch_device, check_tensor, describe, is_interpreted,
                                     resolve_input_precision)

__all__ = [
    "kernel_configs",
    "token_merge_match_triton",
    "token_merge_reduce_backward_triton",
    "token_merge_reduce_triton",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _best_partner_kernel(
    metric_ptr, best_ptr, partner_ptr,
    C, num_a, num_b, prefix_a, prefix_b, eps,
    stride_mb, stride_mn, stride_mc,
    INPUT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    valid_a = offs_a < num_a
    row_m = metric_ptr + b * stride_mb
    rows_a = row_m + (2 * offs_a)[:, None] * stride_mn
    norm_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(rows_a + offs_c[None, :] * stride_mc, mask=valid_a[:, None] & (offs_c[None, :] < C), other=0.0)
        a = a.to(tl.float32)
        norm_a += tl.sum(a * a, axis=1)
    norm_a = tl.maximum(tl.sqrt(norm_a), eps)
    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    partner = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for j0 in range(prefix_b, num_b, BLOCK_B):
        offs_b = j0 + tl.arange(0, BLOCK_B)
        valid_b = offs_b < num_b
        rows_b = row_m + (2 * offs_b.to(tl.int64) + 1)[:, None] * stride_mn
        dots = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        norm_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c[None, :] < C
            a = tl.load(rows_a + offs_c[None, :] * stride_mc, mask=valid_a[:, None] & in_c, other=0.0)
            bt = tl.load(rows_b + offs_c[None, :] * stride_mc, mask=valid_b[:, None] & in_c, other=0.0)
            dots = tl.dot(a, tl.trans(bt), dots, input_precision=INPUT_PRECISION)
            bt32 = bt.to(tl.float32)
            norm_b += tl.sum(bt32 * bt32, axis=1)
        norm_b = tl.maximum(tl.sqrt(norm_b), eps)
        scores = dots / (norm_a[:, None] * norm_b[None, :])
        scores = tl.where(valid_b[None, :], scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_arg = tl.min(tl.where(scores == tile_best[:, None], offs_b[None, :], num_b), axis=1)
        better = tile_best > best  # strict: an earlier tile (lower B) keeps a tie
        partner = tl.where(better, tile_arg, partner)
        best = tl.where(better, tile_best, best)
    best = tl.where(offs_a < prefix_a, float("-inf"), best)
    tl.store(best_ptr + b * num_a + offs_a, best, mask=valid_a)
    tl.store(partner_ptr + b * num_a + offs_a, partner, mask=valid_a)


@triton.jit
def _dest_kernel(
    best_ptr, partner_ptr, dest_ptr,
    num_a, num_b, num_merged, num_prefix, prefix_a, prefix_b, kept_a,
    stride_db, stride_dn,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    best_row = best_ptr + b * num_a
    dest_row = dest_ptr + b * stride_db
    kept_before = tl.zeros((), dtype=tl.int64)
    for i0 in range(0, num_a, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        valid_i = offs_i < num_a
        v_i = tl.load(best_row + offs_i, mask=valid_i, other=float("-inf"))
        rank = tl.zeros((BLOCK_I,), dtype=tl.int64)
        for j0 in range(0, num_a, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            valid_j = offs_j < num_a
            v_j = tl.load(best_row + offs_j, mask=valid_j, other=float("-inf"))
            ahead = (v_j[None, :] > v_i[:, None]) | ((v_j[None, :] == v_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
            rank += tl.sum((ahead & valid_j[None, :]).to(tl.int64), axis=1)
        partner = tl.load(partner_ptr + b * num_a + offs_i, mask=valid_i, other=0).to(tl.int64)
        partner_row = tl.where(partner < prefix_b, 2 * partner + 1, num_prefix + kept_a + partner - prefix_b)
        is_prefix = offs_i < prefix_a
        is_merged = rank < num_merged
        kept = valid_i & ~is_prefix & ~is_merged
        if num_prefix > 0:  # ToMe keeps the A tokens in position order behind the prefix
            kept_row = num_prefix + kept_before + tl.cumsum(kept.to(tl.int64), axis=0) - 1
        else:  # ... and without a prefix in the sorted order
            kept_row = rank - num_merged
        row = tl.where(is_prefix, 2 * offs_i, tl.where(is_merged, partner_row, kept_row))
        tl.store(dest_row + (2 * offs_i) * stride_dn, row, mask=valid_i)
        kept_before += tl.sum(kept.to(tl.int64), axis=0)
    for j0 in range(0, num_b, BLOCK_I):
        offs_j = j0 + tl.arange(0, BLOCK_I).to(tl.int64)
        row = tl.where(offs_j < prefix_b, 2 * offs_j + 1, num_prefix + kept_a + offs_j - prefix_b)
        tl.store(dest_row + (2 * offs_j + 1) * stride_dn, row, mask=offs_j < num_b)


@triton.jit
def _sources_kernel(
    dest_ptr, offsets_ptr, sources_ptr,
    N, num_out,
    stride_db, stride_dn,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    dest_row = dest_ptr + b * stride_db
    offsets_row = offsets_ptr + b * (num_out + 1)
    start = tl.zeros((), dtype=tl.int64)
    for o0 in range(0, num_out, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
        count = tl.zeros((BLOCK_O,), dtype=tl.int64)
        for i0 in range(0, N, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
            d = tl.load(dest_row + offs_i * stride_dn, mask=offs_i < N, other=-1)
            count += tl.sum((d[None, :] == offs_o[:, None]).to(tl.int64), axis=1)
        tl.store(offsets_row + offs_o, start + tl.cumsum(count, axis=0) - count, mask=offs_o < num_out)
        start += tl.sum(count, axis=0)
    tl.store(offsets_row + num_out, start)
    tl.debug_barrier()  # the offsets_ptr above are read back below, by other threads of this program
    for i0 in range(0, N, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        valid_i = offs_i < N
        d_i = tl.load(dest_row + offs_i * stride_dn, mask=valid_i, other=-1)
        earlier = tl.zeros((BLOCK_I,), dtype=tl.int64)
        for j0 in range(0, i0 + BLOCK_I, BLOCK_I):
            offs_j = j0 + tl.arange(0, BLOCK_I).to(tl.int64)
            d_j = tl.load(dest_row + offs_j * stride_dn, mask=offs_j < N, other=-2)
            same = (d_j[None, :] == d_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
            earlier += tl.sum(same.to(tl.int64), axis=1)
        in_range = valid_i & (d_i >= 0) & (d_i < num_out)
        slot = tl.load(offsets_row + d_i, mask=in_range, other=0) + earlier
        tl.store(sources_ptr + b * N + slot, offs_i, mask=in_range & (slot < N))


@triton.jit
def _reduce_kernel(
    x_ptr, size_ptr, offsets_ptr, sources_ptr, merged_ptr, merged_size_ptr,
    N, num_out, D,
    stride_xb, stride_xn, stride_xd, stride_sb, stride_sn,
    HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_r = offs_r < num_out
    valid_d = offs_d < D
    offsets_row = offsets_ptr + b * (num_out + 1)
    lo = tl.load(offsets_row + offs_r, mask=valid_r, other=0)
    count = tl.load(offsets_row + offs_r + 1, mask=valid_r, other=0) - lo
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, tl.max(count, axis=0)):
        has = valid_r & (k < count)
        i = tl.load(sources_ptr + b * N + lo + k, mask=has, other=0)
        has = has & (i >= 0) & (i < N)
        if HAS_SIZE:
            w = tl.load(size_ptr + b * stride_sb + i * stride_sn, mask=has, other=0.0).to(tl.float32)
        else:
            w = tl.where(has, 1.0, 0.0)
        xi = tl.load(x_ptr + b * stride_xb + i[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                     mask=has[:, None] & valid_d[None, :], other=0.0)
        acc += w[:, None] * xi.to(tl.float32)
        total += w
    out = acc / tl.where(valid_r, total, 1.0)[:, None]  # rows past N' are not stored (and would divide 0 by 0)
    tl.store(merged_ptr + (b * num_out + offs_r)[:, None] * D + offs_d[None, :], out.to(merged_ptr.dtype.element_ty),
             mask=valid_r[:, None] & valid_d[None, :])
    if tl.program_id(2) == 0:
        tl.store(merged_size_ptr + b * num_out + offs_r, total, mask=valid_r)


@triton.jit
def _reduce_backward_kernel(
    grad_ptr, dest_ptr, size_ptr, merged_size_ptr, grad_x_ptr,
    N, num_out, D,
    stride_gb, stride_gn, stride_gd, stride_db, stride_dn, stride_sb, stride_sn,
    HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_i = offs_i < N
    valid_d = offs_d < D
    o = tl.load(dest_ptr + b * stride_db + offs_i * stride_dn, mask=valid_i, other=-1)
    ok = valid_i & (o >= 0) & (o < num_out)
    if HAS_SIZE:
        w = tl.load(size_ptr + b * stride_sb + offs_i * stride_sn, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(ok, 1.0, 0.0)
    w = w / tl.load(merged_size_ptr + b * num_out + o, mask=ok, other=1.0)
    g = tl.load(grad_ptr + b * stride_gb + o[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=ok[:, None] & valid_d[None, :], other=0.0)
    tl.store(grad_x_ptr + (b * N + offs_i)[:, None] * D + offs_d[None, :], (g.to(tl.float32) * w[:, None]).to(
        grad_x_ptr.dtype.element_ty), mask=valid_i[:, None] & valid_d[None, :])


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def kernel_configs(num_tokens: int, channels: int, dim: int) -> dict:
    """Launch configuration for N = ``num_tokens`` tokens, a metric of ``channels`` and tokens of ``dim``.

    Returns ``{"partner": {...}, "dest": {...}, "sources": {...}, "reduce": {...}, "backward": {...}}``: each
    kernel's block-size constexprs plus ``num_warps``/``num_stages``, exactly as the launchers pass them, so the
    AOT test compiles (and checks for spills) what actually runs. Fixed table, no ``triton.autotune``:

    * partner: (64 A, 32 B) score tiles, C in chunks of up to 32 (at least 16, ``tl.dot``'s minimum): 64 rows
      let sm_90 use ``wgmma``; 64 x 64 tiles or 64-wide chunks spilled (AOT test).
    * dest, sources: (64, 64) comparison tiles (16 a thread on 4 warps).
    * reduce, backward: (16 rows, up to 128 columns) tiles; narrower for narrow tokens.
    """
    width = triton.next_power_of_2(max(int(dim), 1))
    return {
        "partner": dict(BLOCK_A=64, BLOCK_B=32, BLOCK_C=max(16, min(triton.next_power_of_2(max(int(channels), 1)), 32)),
                        num_warps=4, num_stages=1),
        "dest": dict(BLOCK_I=64, BLOCK_J=64, num_warps=4, num_stages=1),
        "sources": dict(BLOCK_O=64, BLOCK_I=64, num_warps=4, num_stages=1),
        "reduce": dict(BLOCK_R=16, BLOCK_D=min(width, 128), num_warps=4, num_stages=1),
        "backward": dict(BLOCK_R=16, BLOCK_D=min(width, 128), num_warps=4, num_stages=1),
    }


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def token_merge_match_triton(metric, r, num_prefix, input_precision=None):
    """Every token's output row after merging ``r`` tokens (see :mod:`clipfast.reference.token_merge`).

    Args:
        metric: (B, N, C) float32/float16/bfloat16, any strides, CUDA (or CPU under the interpreter).
        r: tokens to merge (capped to ``(N - P) // 2``).
        num_prefix: P protected tokens at the front, ``0 <= P <= N``.
        input_precision: "ieee" or "tf32" for fp32 metrics; None follows PyTorch's matmul precision.

    Returns:
        dest: (B, N) int64.
    """
    check_tensor(metric, "metric", 3, _DTYPES)
    check_launch_device(_INTERPRETED, metric=metric)
    batch, n, channels = metric.shape
    check_int(r, "r", 0)
    check_int(num_prefix, "num_prefix", 0, n)
    merged = merge_count(n, r, num_prefix)
    if merged == 0 or batch == 0:
        return torch.arange(n, device=metric.device).expand(batch, n).contiguous()
    num_a, num_b = (n + 1) // 2, n // 2
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    cfgs = kernel_configs(n, channels, 1)
    best = torch.empty((batch, num_a), dtype=torch.float32, device=metric.device)
    partner = torch.empty((batch, num_a), dtype=torch.int32, device=metric.device)
    cfg = cfgs["partner"]
    _best_partner_kernel[(batch, triton.cdiv(num_a, cfg["BLOCK_A"]))](
        metric, best, partner, channels, num_a, num_b, prefix_a, prefix_b, METRIC_NORM_EPS, *metric.stride(),
        INPUT_PRECISION=resolve_input_precision(input_precision, metric.dtype), **cfg,
    )  # fmt: skip
    dest = torch.empty((batch, n), dtype=torch.int64, device=metric.device)
    _dest_kernel[(batch,)](
        best, partner, dest, num_a, num_b, merged, num_prefix, prefix_a, prefix_b, num_a - prefix_a - merged,
        *dest.stride(), **cfgs["dest"],
    )  # fmt: skip
    return dest


def _check_reduce_launch(tokens, dest, size, num_out, name):
    check_tensor(tokens, name, 3, _DTYPES)
    check_tensor(dest, "dest", 2, (torch.int64,))
    torch._check(dest.shape[0] == tokens.shape[0],
                 lambda: f"dest must have the batch of {name}, got {describe(dest)} and {describe(tokens)}")
    check_int(num_out, "num_out", 0, dest.shape[1])
    if size is not None:
        check_tensor(size, "size", 2, (torch.float32,))
        torch._check(size.shape == dest.shape, lambda: f"size must have dest's shape, got {describe(size)}")
    check_launch_device(_INTERPRETED, tokens=tokens, dest=dest, size=size)


def token_merge_reduce_triton(x, dest, size, num_out):
    """The size-weighted mean of every output row's sources.

    Args:
        x: (B, N, D) float32/float16/bfloat16, any strides, CUDA (or CPU under the interpreter).
        dest: (B, N) int64 in [0, num_out), every output row hit at least once (from the match).
        size: None (ones) or (B, N) float32.
        num_out: N'.

    Returns:
        (merged (B, N', D) contiguous in x's dtype, merged_size (B, N') float32).
    """
    _check_reduce_launch(x, dest, size, num_out, "x")
    torch._check(dest.shape[1] == x.shape[1], lambda: f"dest must be (B, N) for x {describe(x)}, got {describe(dest)}")
    batch, n, dim = x.shape
    merged = torch.empty((batch, num_out, dim), dtype=x.dtype, device=x.device)
    merged_size = torch.empty((batch, num_out), dtype=torch.float32, device=x.device)
    if merged_size.numel() == 0:
        return merged, merged_size
    cfgs = kernel_configs(n, 1, dim)
    offsets = torch.empty((batch, num_out + 1), dtype=torch.int64, device=x.device)
    sources = torch.empty((batch, n), dtype=torch.int64, device=x.device)
    _sources_kernel[(batch,)](dest, offsets, sources, n, num_out, *dest.stride(), **cfgs["sources"])
    cfg = cfgs["reduce"]
    size_arg, size_strides = (size, size.stride()) if size is not None else (merged_size, (0, 0))
    grid = (batch, triton.cdiv(num_out, cfg["BLOCK_R"]), triton.cdiv(max(dim, 1), cfg["BLOCK_D"]))
    _reduce_kernel[grid](
        x, size_arg, offsets, sources, merged, merged_size, n, num_out, dim, *x.stride(), *size_strides,
        HAS_SIZE=size is not None, **cfg,
    )  # fmt: skip
    return merged, merged_size


def token_merge_reduce_backward_triton(grad_merged, dest, size, merged_size):
    """``grad_x[i] = size_i / merged_size[dest_i] * grad_merged[dest_i]``.

    Args:
        grad_merged: (B, N', D) float32/float16/bfloat16, any strides, CUDA (or CPU under the interpreter).
        dest: (B, N) int64 in [0, N').
        size: None (ones) or (B, N) float32.
        merged_size: (B, N') float32, contiguous.

    Returns:
        grad_x: (B, N, D) contiguous in grad_merged's dtype.
    """
    num_out = grad_merged.shape[1]
    _check_reduce_launch(grad_merged, dest, size, num_out, "grad_merged")
    check_tensor(merged_size, "merged_size", 2, (torch.float32,))
    torch._check(merged_size.shape == (grad_merged.shape[0], num_out) and merged_size.is_contiguous(),
                 lambda: f"merged_size must be contiguous (B, N'), got {describe(merged_size)}")
    batch, n, dim = dest.shape[0], dest.shape[1], grad_merged.shape[2]
    grad_x = torch.empty((batch, n, dim), dtype=grad_merged.dtype, device=grad_merged.device)
    if grad_x.numel() == 0:
        return grad_x
    cfg = kernel_configs(n, 1, dim)["backward"]
    size_arg, size_strides = (size, size.stride()) if size is not None else (merged_size, (0, 0))
    grid = (batch, triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(dim, cfg["BLOCK_D"]))
    _reduce_backward_kernel[grid](
        grad_merged, dest, size_arg, merged_size, grad_x, n, num_out, dim, *grad_merged.stride(), *dest.stride(),
        *size_strides, HAS_SIZE=size is not None, **cfg,
    )  # fmt: skip
    return grad_x


_INTERPRETED = is_interpreted(_reduce_kernel)
