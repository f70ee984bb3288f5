"""Triton kernels for attentive token removal (token_keep): selection, row gather, and its backward.

Spec: :mod:`clipfast.reference.token_keep`. ``scores: (B, L)``, ``tokens: (B, P + L, D)`` (P prefix
tokens, then L patch tokens), ``keep_index: (B, K)`` int64 ascending patch indices, ``fuse_weights: (B, L)``
(optional, EViT's fused token of the dropped patches).

Algorithm
---------
* ``_keep_index_kernel``, grid ``(B,)``: one program per batch row ranks the row's ``N`` candidates, the
  patches (``block == 1``) or the ``b x b`` blocks of the ``(L / W, W)`` patch grid (``N = L / b^2``,
  ``W = grid_width``). A block's score is recomputed wherever it is needed as the sum of its b*b patch
  scores added one by one in row-major order in the scores' dtype, so it is bitwise the reference's sum.
  Scores become integer order keys (bitcast to int32 / int64, sign | magnitude turned into +-magnitude
  so both zeros are 0 and the integers order as the floats do, NaN mapped to the largest integer,
  above ``+inf``), so the total order is one integer comparison. Candidate ``q``'s rank is

      rank_q = #{j : key_j > key_q} + #{j < q : key_j == key_q}        (0 = best; a permutation)

  counted in ``(BLOCK_I, BLOCK_J)`` comparison tiles. The program walks the L patches in ascending order
  in ``BLOCK_I`` tiles: patch i belongs to candidate ``q(i)`` (itself, or its block), is kept iff
  ``rank_q(i) < K / b^2``, and is stored at output position = number of kept patches before it (an
  exclusive ``tl.cumsum`` of the kept flags plus the count of the previous tiles). The output is thus
  ascending, each kept block expanded into its b*b patches, with no sort. O(L N) comparisons per row.
* ``_gather_rows_kernel``, grid ``(B, cdiv(P + K, BLOCK_R), cdiv(D, BLOCK_D))``: output row r copies token
  row r (r < P) or ``P + keep_index[b, r - P]``: a pure copy, bitwise exact in every dtype.
* ``_gather_fused_kernel``, grid ``(B, cdiv(D, BLOCK_D))`` (with ``fuse_weights`` only): output row
  ``P + K`` = ``sum_{i dropped} w_i tokens[b, P + i]`` over all L patches in ``BLOCK_L`` tiles, in the
  weights' dtype (fp32; fp64 for fp64 tokens): a tile sum, then tiles in ascending order.
* ``_gather_backward_kernel``, grid ``(B, cdiv(P + L, BLOCK_R))``: one program owns ``BLOCK_R`` complete
  rows of ``grad_tokens`` (and the matching ``grad_weights`` entries) and loops over D in ``BLOCK_D``
  chunks, so every row is written exactly once (no zero fill, no scatter): prefix rows copy
  ``grad_kept``, kept patch i copies ``grad_kept[P + j]`` with ``keep_index[b, j] = i``, dropped patch i
  gets ``w_i * grad_fused`` (or 0 without fusion), and ``grad_weights[b, i] = <tokens[b, P + i],
  grad_fused>`` for dropped i (0 for kept i), a tile sum per D chunk, chunks in ascending order. Without
  fusion the tokens' memory is never read (only their shape, dtype and device are used).

The inverse map patch -> position j (or -1 when dropped) is built in registers by each program that needs
it (``_keep_position``: ``(rows, BLOCK_K)`` equality tests over the K entries, O(rows K), no scratch
memory). keep_index is trusted to be ascending, unique and in [0, L) (checking it would synchronise with
the host); an out-of-range entry never causes an out-of-bounds access (its gathered row is zero).

Determinism: every output element is owned by one program and computed in a fixed order (no atomics);
results are bitwise reproducible run to run. Index arithmetic on tensors is 64-bit.

All launchers accept CUDA tensors, or CPU tensors when Triton runs under its interpreter (``TRITON_INTERPRET=1``
set before this module is imported). Scores may be float32 or float64, tokens float32, float16, bfloat16 or
float64, all with arbitrary strides.
"""

import torch
import triton
import triton.language as tl

from clipfast.triton_kernels import check_int, check_launch_device, check_tensor, describe, is_interpreted

__all__ = [
    "kernel_configs",
    "token_keep_gather_backward_triton",
    "token_keep_gather_triton",
    "token_keep_index_triton",
]

_SCORE_DTYPES = (torch.float32, torch.float64)
_TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    """Signed integers (int32 for fp32, int64 for fp64) ordered as ``x`` under the total order: NaN above
    +inf, -0.0 == +0.0. Integer arithmetic only, so no floating-point rewrite can merge or split them."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        top = 0x7FFFFFFFFFFFFFFF
        inf_bits = 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        top = 0x7FFFFFFF
        inf_bits = 0x7F800000
    # Sign | magnitude -> +-magnitude: both zeros become 0, larger negative magnitudes become smaller keys.
    magnitude = bits & top
    key = tl.where(bits < 0, -magnitude, magnitude)
    return tl.where(magnitude > inf_bits, top, key)


@triton.jit
def _candidate_keys(scores_row, stride_sl, q, valid, W, SIDE: tl.constexpr):
    """Order keys of candidates ``q`` (patch indices when SIDE == 1, else row-major b x b block indices of
    the ``(L / W, W)`` grid): the block sum added in row-major order, as the reference does."""
    if SIDE == 1:
        first = q
    else:
        first = (q // (W // SIDE)) * (SIDE * W) + (q % (W // SIDE)) * SIDE
    total = tl.load(scores_row + first.to(tl.int64) * stride_sl, mask=valid, other=0.0)
    for k in tl.static_range(1, SIDE * SIDE):
        patch = first + (k // SIDE) * W + (k % SIDE)
        total = total + tl.load(scores_row + patch.to(tl.int64) * stride_sl, mask=valid, other=0.0)
    return _order_key(total)


@triton.jit
def _keep_index_kernel(
    scores_ptr,
    out_ptr,
    L,
    W,
    num_candidates,
    count,
    num_keep,
    stride_sb,
    stride_sl,
    SIDE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """out[b] = ascending indices of the patches of the ``count`` best candidates of scores[b].

    scores: (B, L) fp32/fp64 any strides; out: (B, num_keep) int64 contiguous, num_keep = count * SIDE^2.
    Candidates: the L patches (SIDE == 1) or the ``num_candidates`` = L / SIDE^2 blocks of the grid of
    width W. Grid: (B,).
    """
    row = tl.program_id(0).to(tl.int64)
    scores_row = scores_ptr + row * stride_sb
    out_row = out_ptr + row * num_keep
    done = 0
    for i0 in range(0, L, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        valid_i = offs_i < L
        if SIDE == 1:
            q_i = offs_i
        else:
            q_i = (offs_i // W // SIDE) * (W // SIDE) + (offs_i % W) // SIDE
        key_i = _candidate_keys(scores_row, stride_sl, q_i, valid_i, W, SIDE)
        rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
        for j0 in range(0, num_candidates, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid_j = offs_j < num_candidates
            key_j = _candidate_keys(scores_row, stride_sl, offs_j, valid_j, W, SIDE)
            ahead = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None])
                                                        & (offs_j[None, :] < q_i[:, None]))
            rank += tl.sum((ahead & valid_j[None, :]).to(tl.int32), axis=1)
        kept = ((rank < count) & valid_i).to(tl.int32)
        pos = done + tl.cumsum(kept, axis=0) - kept
        tl.store(out_row + pos, offs_i.to(tl.int64), mask=kept != 0)
        done += tl.sum(kept, axis=0)


@triton.jit
def _keep_position(keep_row, stride_kk, i, K, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_I,) int32: the j with ``keep_row[j] == i`` (the patch's row among the kept ones), -1 if none."""
    pos = tl.full((BLOCK_I,), -1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        kv = tl.load(keep_row + ks.to(tl.int64) * stride_kk, mask=kmask, other=0)
        hit = (kv[None, :] == i.to(tl.int64)[:, None]) & kmask[None, :]
        pos = tl.maximum(pos, tl.max(tl.where(hit, ks[None, :], -1), axis=1))
    return pos


@triton.jit
def _gather_rows_kernel(
    tokens_ptr,
    keep_ptr,
    out_ptr,
    P,
    L,
    K,
    D,
    rows_out,
    stride_tb,
    stride_tn,
    stride_td,
    stride_kb,
    stride_kk,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, r] = tokens[b, r] (r < P), tokens[b, P + keep[b, r - P]] (P <= r < P + K).

    tokens: (B, P + L, D) any strides; keep: (B, K) int64 any strides; out: (B, rows_out, D) contiguous
    (rows_out = P + K, +1 for the fused row written by ``_gather_fused_kernel``).
    Grid: (B, cdiv(P + K, BLOCK_R), cdiv(D, BLOCK_D)).
    """
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    prefix = r < P
    patch = (r >= P) & (r < P + K)
    idx = tl.load(keep_ptr + b * stride_kb + (r - P).to(tl.int64) * stride_kk, mask=patch, other=0)
    src = tl.where(prefix, r.to(tl.int64), P + idx)
    found = prefix | (patch & (idx >= 0) & (idx < L))
    x = tl.load(tokens_ptr + b * stride_tb + src[:, None] * stride_tn + d.to(tl.int64)[None, :] * stride_td,
                mask=found[:, None] & d_mask[None, :], other=0)
    out = out_ptr + b * rows_out * D + r.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(out, x, mask=(r < P + K)[:, None] & d_mask[None, :])


@triton.jit
def _gather_fused_kernel(
    tokens_ptr,
    keep_ptr,
    weights_ptr,
    out_ptr,
    P,
    L,
    K,
    D,
    rows_out,
    stride_tb,
    stride_tn,
    stride_td,
    stride_kb,
    stride_kk,
    stride_wb,
    stride_wl,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b, P + K] = sum_{i dropped} w[b, i] tokens[b, P + i], accumulated in w's dtype.

    weights: (B, L) fp32/fp64 any strides; other arguments as ``_gather_rows_kernel``.
    Grid: (B, cdiv(D, BLOCK_D)).
    """
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    keep_row = keep_ptr + b * stride_kb
    tok_cols = tokens_ptr + b * stride_tb + d.to(tl.int64)[None, :] * stride_td
    acc = tl.zeros((BLOCK_D,), dtype=weights_ptr.dtype.element_ty)
    for i0 in range(0, L, BLOCK_L):
        i = i0 + tl.arange(0, BLOCK_L)
        dropped = (i < L) & (_keep_position(keep_row, stride_kk, i, K, BLOCK_L, BLOCK_K) < 0)
        w = tl.load(weights_ptr + b * stride_wb + i.to(tl.int64) * stride_wl, mask=dropped, other=0.0)
        x = tl.load(tok_cols + (P + i).to(tl.int64)[:, None] * stride_tn, mask=dropped[:, None] & d_mask[None, :],
                    other=0.0)
        acc += tl.sum(w[:, None] * x.to(acc.dtype), axis=0)
    # tl.cast, not .to: P + K is a constexpr when the JIT specialises both to 1.
    out = out_ptr + b * rows_out * D + tl.cast(P + K, tl.int64) * D + d
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _gather_backward_kernel(
    grad_ptr,
    tokens_ptr,
    keep_ptr,
    weights_ptr,
    grad_tokens_ptr,
    grad_weights_ptr,
    P,
    L,
    K,
    D,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_tb,
    stride_tn,
    stride_td,
    stride_kb,
    stride_kk,
    stride_wb,
    stride_wl,
    FUSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [BLOCK_R * pid, +BLOCK_R) of grad_tokens (B, P + L, D) contiguous and, with FUSE, the matching
    entries of grad_weights (B, L) contiguous in the weights' dtype.

    grad: (B, P + K (+1 with FUSE), D) any strides; tokens (read only with FUSE) and weights as in the
    forward. Grid: (B, cdiv(P + L, BLOCK_R)).
    """
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = r < P + L
    i = r - P
    pos = _keep_position(keep_ptr + b * stride_kb, stride_kk, i, K, BLOCK_R, BLOCK_K)
    copy = valid & ((r < P) | (pos >= 0))
    src = tl.where(r < P, r, P + pos).to(tl.int64)
    grad_rows = grad_ptr + b * stride_gb + src[:, None] * stride_gn
    out_rows = grad_tokens_ptr + b * (P + L) * D + r.to(tl.int64)[:, None] * D
    if FUSE:
        dropped = valid & (r >= P) & (pos < 0)
        w = tl.load(weights_ptr + b * stride_wb + i.to(tl.int64) * stride_wl, mask=dropped, other=0.0)
        tok_rows = tokens_ptr + b * stride_tb + r.to(tl.int64)[:, None] * stride_tn
        fused_row = grad_ptr + b * stride_gb + tl.cast(P + K, tl.int64) * stride_gn
        dot = tl.zeros((BLOCK_R,), dtype=w.dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        cols = d.to(tl.int64)[None, :]
        g = tl.load(grad_rows + cols * stride_gd, mask=copy[:, None] & d_mask[None, :], other=0)
        if FUSE:
            gf = tl.load(fused_row + cols * stride_gd, mask=d_mask[None, :], other=0).to(w.dtype)
            x = tl.load(tok_rows + cols * stride_td, mask=dropped[:, None] & d_mask[None, :], other=0)
            dot += tl.sum(x.to(w.dtype) * gf, axis=1)
            g = tl.where(copy[:, None], g.to(w.dtype), w[:, None] * gf)
        tl.store(out_rows + cols, g.to(grad_tokens_ptr.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])
    if FUSE:
        tl.store(grad_weights_ptr + b * L + i, tl.where(dropped, dot, 0.0), mask=valid & (r >= P))


_INTERPRETED = is_interpreted(_keep_index_kernel)


# --------------------------------------------------------------------------------------------
# Block-size policy
# --------------------------------------------------------------------------------------------


def kernel_configs(num_patches: int, dim: int, block: int = 1) -> dict:
    """Launch configuration for rows of ``num_patches`` patches of width ``dim``, blocks of ``block``^2.

    Returns ``{"index": {...}, "gather": {...}, "fused": {...}, "backward": {...}}``: each kernel's
    block-size constexprs plus ``num_warps``/``num_stages``, exactly as the launchers pass them, so the AOT
    test compiles (and checks for spills) what actually runs. Fixed table, no ``triton.autotune`` (that
    needs a GPU to benchmark); the same for every dtype (tiles are sized for 4-byte elements, so fp64
    tiles take twice the registers and 16-bit ones half):

    * index: ``BLOCK_I`` = next_pow2(L) patches up to 256, ``BLOCK_J`` candidates per comparison tile so
      the (BLOCK_I, BLOCK_J) tile is 4096 comparisons at most (32 a thread on 4 warps).
    * gather: (16 rows, 256 columns) copy tiles; fused: (32 patches, 128 columns) tiles, keep_index
      compared 64 entries at a time; backward: (16 rows, 128 columns) per D step, 64 keep entries at a
      time. Widths shrink to next_pow2(D) for narrow tokens.
    """
    length = max(int(num_patches), 1)
    candidates = max(length // (block * block), 1)
    width = triton.next_power_of_2(max(int(dim), 1))
    block_i = min(triton.next_power_of_2(length), 256)
    block_j = min(triton.next_power_of_2(candidates), 4096 // block_i)
    return {
        "index": dict(BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4, num_stages=1),
        "gather": dict(BLOCK_R=16, BLOCK_D=min(width, 256), num_warps=4, num_stages=1),
        "fused": dict(BLOCK_L=32, BLOCK_D=min(width, 128), BLOCK_K=64, num_warps=4, num_stages=1),
        "backward": dict(BLOCK_R=16, BLOCK_D=min(width, 128), BLOCK_K=64, num_warps=4, num_stages=1),
    }


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _weights_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_gather_launch(tokens, keep_index, fuse_weights, num_prefix):
    """(P, L, K) of a gather or its backward, after checking the launch's invariants (see
    :mod:`clipfast.triton_kernels`): the shapes, dtypes and device the kernels index with."""
    check_tensor(tokens, "tokens", 3, _TOKEN_DTYPES)
    check_tensor(keep_index, "keep_index", 2, (torch.int64,))
    check_int(num_prefix, "num_prefix", 0, tokens.shape[1])
    batch, length, num_keep = tokens.shape[0], tokens.shape[1] - num_prefix, keep_index.shape[1]
    torch._check(keep_index.shape[0] == batch and num_keep <= length,
                 lambda: f"keep_index must have shape (B, K) with B = {batch} and K <= {length} patches, got "
                         f"{tuple(keep_index.shape)}")
    if fuse_weights is not None:
        check_tensor(fuse_weights, "fuse_weights", 2, (_weights_dtype(tokens.dtype),))
        torch._check(fuse_weights.shape == (batch, length),
                     lambda: f"fuse_weights must have shape (B, L) = ({batch}, {length}), got {describe(fuse_weights)}")
    check_launch_device(_INTERPRETED, tokens=tokens, keep_index=keep_index, fuse_weights=fuse_weights)
    return num_prefix, length, num_keep


def token_keep_index_triton(scores, num_keep, grid_width, block):
    """Indices of the ``num_keep`` best patches (or patches of the best blocks) of every row.

    Args:
        scores: (B, L) float32/float64, any strides, CUDA (or CPU under the interpreter).
        num_keep: K, 1 <= K <= L (a multiple of block^2 when block > 1).
        grid_width: W, the patch grid's width (ignored when block == 1): L % W == 0, W % block == 0 and
            (L / W) % block == 0.
        block: b >= 1, the side of the blocks ranked together.

    Returns:
        (B, K) int64, ascending per row.
    """
    # The launch's invariants (see :mod:`clipfast.triton_kernels`): the kernel sizes its output by num_keep and
    # maps patches to blocks with grid_width and block, so a mismatch would write past a row.
    check_tensor(scores, "scores", 2, _SCORE_DTYPES)
    check_launch_device(_INTERPRETED, scores=scores)
    batch, length = scores.shape
    check_int(num_keep, "num_keep", 1, length)
    check_int(grid_width, "grid_width", 0)
    check_int(block, "block", 1)
    if block > 1:
        torch._check(grid_width >= 1 and length % grid_width == 0 and grid_width % block == 0
                     and (length // grid_width) % block == 0,
                     lambda: f"block={block} needs a grid_width W dividing L = {length} with W and L / W multiples of "
                             f"the block, got grid_width={grid_width}")
        torch._check(num_keep % (block * block) == 0,
                     lambda: f"num_keep must be a multiple of block^2 = {block * block}, got {num_keep}")
    else:
        grid_width = length  # unused by the kernel's block == 1 path
    out = torch.empty((batch, num_keep), dtype=torch.int64, device=scores.device)
    if batch == 0:
        return out
    cfg = kernel_configs(length, 1, block)["index"]
    _keep_index_kernel[(batch,)](
        scores, out, length, grid_width, length // (block * block), num_keep // (block * block), num_keep,
        scores.stride(0), scores.stride(1), SIDE=block, **cfg,
    )  # fmt: skip
    return out


def token_keep_gather_triton(tokens, keep_index, fuse_weights, num_prefix):
    """The prefix rows, the kept patch rows and (with ``fuse_weights``) the fused row of the dropped ones.

    Args:
        tokens: (B, P + L, D) float32/float16/bfloat16/float64, any strides, CUDA (or CPU under the
            interpreter).
        keep_index: (B, K) int64 ascending unique patch indices in [0, L), any strides.
        fuse_weights: None, or (B, L) float32 (float64 for float64 tokens), any strides.
        num_prefix: P.

    Returns:
        (B, P + K (+1 with fuse_weights), D) contiguous in the tokens' dtype.
    """
    P, L, K = _check_gather_launch(tokens, keep_index, fuse_weights, num_prefix)
    batch, _, dim = tokens.shape
    rows_out = P + K + (fuse_weights is not None)
    out = torch.empty((batch, rows_out, dim), dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    cfgs = kernel_configs(L, dim)
    strides = (*tokens.stride(), *keep_index.stride())
    if P + K > 0:
        cfg = cfgs["gather"]
        grid = (batch, triton.cdiv(P + K, cfg["BLOCK_R"]), triton.cdiv(dim, cfg["BLOCK_D"]))
        _gather_rows_kernel[grid](tokens, keep_index, out, P, L, K, dim, rows_out, *strides, **cfg)
    if fuse_weights is not None:
        cfg = cfgs["fused"]
        _gather_fused_kernel[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
            tokens, keep_index, fuse_weights, out, P, L, K, dim, rows_out, *strides, *fuse_weights.stride(), **cfg,
        )  # fmt: skip
    return out


def token_keep_gather_backward_triton(grad_kept, tokens, keep_index, fuse_weights, num_prefix):
    """Gradients of :func:`token_keep_gather_triton` w.r.t. tokens and fuse_weights.

    Args:
        grad_kept: (B, P + K (+1 with fuse_weights), D) in the tokens' dtype, any strides.
        tokens, keep_index, fuse_weights, num_prefix: the forward's arguments. Without fuse_weights only
            the tokens' shape, dtype and device are used (it may be a stride-0 expanded stand-in).

    Returns:
        ``(grad_tokens, grad_weights)``: (B, P + L, D) contiguous in the tokens' dtype; (B, L) in the
        weights' dtype with fuse_weights, else an empty (B, 0) float32 (float64 for float64 tokens).
    """
    P, L, K = _check_gather_launch(tokens, keep_index, fuse_weights, num_prefix)
    fuse = fuse_weights is not None
    batch, _, dim = tokens.shape
    check_tensor(grad_kept, "grad_kept", 3, (tokens.dtype,))
    torch._check(grad_kept.shape == (batch, P + K + fuse, dim),
                 lambda: f"grad_kept must have shape ({batch}, {P + K + fuse}, {dim}), got {describe(grad_kept)}")
    check_launch_device(_INTERPRETED, grad_kept=grad_kept, tokens=tokens)
    grad_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    wdtype = _weights_dtype(tokens.dtype)
    grad_weights = torch.empty((batch, L if fuse else 0), dtype=wdtype, device=tokens.device)
    if grad_tokens.numel() == 0 and grad_weights.numel() == 0:
        return grad_tokens, grad_weights
    cfg = kernel_configs(L, dim)["backward"]
    # Without fusion the tokens and weights pointers are never dereferenced (FUSE is a constexpr).
    weights = fuse_weights if fuse else grad_weights
    _gather_backward_kernel[(batch, triton.cdiv(P + L, cfg["BLOCK_R"]))](
        grad_kept, tokens, keep_index, weights, grad_tokens, grad_weights, P, L, K, dim,
        *grad_kept.stride(), *tokens.stride(), *keep_index.stride(), *weights.stride(), FUSE=fuse, **cfg,
    )  # fmt: skip
    return grad_tokens, grad_weights
