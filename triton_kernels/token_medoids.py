"""Triton kernels for the token_medoids index op: k-medoids with KKZ initialisation over token segments.

Spec: :mod:`clipfast.reference.token_medoids` (``token_medoids_index_reference``). ``x: (R, N, D)`` holds R
independent rows (segments) of N tokens; per row the op returns the K medoid token indices (ascending) and
every token's cluster (an index into the sorted medoids). Ties always go to the LOWEST index.

Algorithm
---------
The launcher walks the rows in groups (a Python loop, no host synchronisation); a group holds at most
``_SCRATCH_ELEMS`` fp32 distances (whole chunks of ``split_size`` rows) and runs two kernels:

* ``_pairwise_distance_kernel``, two passes: the (N, N) fp32 distance matrix of each row into a scratch
  tensor from the row's Gram ``G_ij = <c_i, c_j>``, plus each token's raw norm ``||x_n||_2`` (for the KKZ
  start; an fp32 sum of squares). ``c = x - mean_row`` (fp32) for euclidean on fp32 inputs (distances are
  translation invariant; centring cuts the cancellation below), ``c = x`` otherwise. Gram tiles are
  ``tl.dot`` products accumulated over D in ``BLOCK_D`` chunks, all by one helper (``_gram_tile``):
    - diagonal pass, grid ``(rows, T)``, ``T = cdiv(N, BLOCK_I)``: tile (b, b); its diagonal ``G_ii`` goes to a
      (rows, N) scratch, and its upper triangle to the distances (mirrored);
    - off-diagonal pass, grid ``(rows, T, T)``: tile (bi, bj) for bi < bj, mirrored to (bj, bi) (programs with
      bi >= bj exit at once), reading ``G_ii`` and ``G_jj`` from the scratch;
    - euclidean ``sqrt(max((G_ii + G_jj) - 2 G_ij, 0))``; cosine ``1 - G_ij / (max(sqrt G_ii, 1e-8)
      max(sqrt G_jj, 1e-8))``. The diagonal is set to exactly 0.
  Guarantees: each pair is computed once and mirrored, so the matrix is exactly symmetric (exact ties, e.g.
  the two members of a two-token cluster, stay ties). Two copies of a token are at euclidean distance
  exactly 0: ``G_ii``, ``G_i'i'`` and ``G_ii'`` are dot products of equal vectors by the same code path
  (diagonal tiles run the same loop as off-diagonal ones, and ``G_ii`` is read from a tile, never recomputed
  another way), and on a GPU each ``mma`` / ``wgmma`` output element (or each element of the FMA loop of an
  "ieee" fp32 dot) is accumulated by the same sequence of k-steps whatever its position in the tile, so the
  three are bitwise equal and ``(G + G) - 2 G = 0``. The Triton interpreter's ``tl.dot`` (one BLAS matmul)
  rounds elements differently by position; the tests run it through ``gemm_work.position_independent_dot``,
  which restores the GPU behaviour. Cosine duplicates are rounding noise of either sign (as in the reference).
* ``_medoids_kernel``, grid ``(cdiv(rows, S),)`` with ``S = split_size`` (or 1 when ``split_size == 0``):
  one program owns a chunk of S consecutive rows, so chunk-level stopping needs no cross-program sync.
  Per-token quantities are (BLOCK_N,) vectors, ``BLOCK_N = next_pow2(N)``; the medoid list of a row is a
  (BLOCK_K,) vector kept between iterations in the output ``medoid_index`` (int64), which doubles as the
  scratch (``tl.debug_barrier`` orders the stores and reloads across threads).
    1. KKZ: ``m_0`` = argmax of the raw norms; then K - 1 times ``m_k`` = argmax of the running-min
       vector ``min_{j<k} D[m_j, :]`` (updated with the new medoid's distance row; chosen lanes are -inf,
       so the K medoids are distinct tokens even when fewer than K tokens differ). Argmax / argmin with
       lowest-index ties = a max (min) reduction, then the min index among the lanes equal to it.
    2. Up to ``max_iters`` iterations over all rows of the chunk, stopping after the first iteration in
       which no row of the chunk changed: assignment ``a_n = argmin_k D[m_k, n]`` (K distance rows,
       strict ``<`` so the lowest k wins; a medoid's own lane goes to its cluster); update: for i = 0..N-1 load row i of D, ``cost_i = sum_{j: a_j
       = a_i} D[i, j]``, and keep per cluster the lowest-cost (then lowest) i in a (BLOCK_K,) best-cost
       / best-index pair, initialised with the current medoids (an empty cluster keeps its medoid).
       O(N^2 + K N) work per row and iteration; no (K, N, N) temporaries.
    3. Sort the medoids ascending by rank (``rank_k = #{k': m_k' < m_k} + #{k' < k: m_k' = m_k}``, a
       stable O(K^2) loop) and assign every token to its nearest sorted medoid.
  The programs are latency bound (one program per row or chunk); this op is about determinism and matching
  the reference index for index, not peak throughput.

Work (GEMM-equivalents: one is a segment's ``N x N x D`` Gram, ``2 N^2 D`` flops; every executed ``tl.dot``
counts ``2 M K N`` flops of its padded operand blocks; tests/ops/test_token_medoids_triton.py counts them under
the interpreter): the distance tiles execute ``(T + 1) / 2T`` GEMM-equivalents on ``tl.dot`` (the T diagonal
tiles and the ``T (T - 1) / 2`` tiles above them, each once; N and D rounded up to whole blocks), e.g. 3/4 at
T = 2, 17/32 at N = 1024 (T = 16). Before, the same ``(T + 1) / 2T`` of multiply-adds ran as fp32 broadcasts
on the CUDA cores and 0 on ``tl.dot``. The medoid iterations issue no ``tl.dot``.

Precision. 16-bit inputs multiply in their own dtype on the tensor cores (exact products, fp32 accumulation;
not centred, which would round ``x - mean`` back to 16 bits). fp32 inputs: the dots take the centred fp32
operands with ``input_precision``, which the op passes from :func:`clipfast.backends.triton_input_precision`
(PyTorch's float32 matmul precision): "ieee" is exact fp32 on the FMA units, "tf32" runs the tensor cores
(operands truncated to 10 mantissa bits: distances to about 1e-3 relative of the largest in the row).
The Gram form trades the old direct differences' full accuracy for tensor cores: a squared distance carries an
absolute error of a few ulps of ``||c_i||^2``, so tokens far from their row's mean (in units of their
distances) lose relative accuracy.

Determinism: each output is owned by one program and computed in a fixed order (no atomics); results are
bitwise reproducible run to run. Scratch memory: ``_SCRATCH_ELEMS`` fp32 (256 MiB) at most, or one chunk's
``S N^2`` fp32 if larger, plus (rows, N) fp32 norms and Gram diagonals and, for centred rows, (rows, D) fp32
means.

All launchers accept CUDA tensors, or CPU tensors when Triton runs under its interpreter (``TRITON_INTERPRET=1``
set before this module is imported). ``x`` may be float32, float16 or bfloat16 with arbitrary strides; index
arithmetic into the distance scratch is 64-bit.
"""

import torch
import triton
import triton.language as tl

from clipfast.triton_kernels import (INPUT_PRECISIONS, check_int, check_launch_device, check_tensor, is_interpreted,
                                     resolve_input_precision)

__all__ = ["kernel_configs", "token_medoids_index_triton"]

METRICS = ("euclidean", "cosine")
COSINE_NORM_EPS = 1e-8
MAX_TOKENS = 1024
_METRIC_ID = {name: i for i, name in enumerate(METRICS)}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# At most this many fp32 distances (256 MiB) exist at a time, unless a single split_size chunk needs more.
_SCRATCH_ELEMS = 1 << 26


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gram_tile(x_row, mean_row, offs_i, offs_j, mask_i, mask_j, D, stride_xn, stride_xd,
               CENTRE: tl.constexpr, DIAGONAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(G, sq)``: the (BLOCK_I, BLOCK_J) fp32 Gram tile ``<c_i, c_j>`` accumulated over D in BLOCK_D chunks by
    ``tl.dot``, with ``c = x - mean`` (fp32) when CENTRE else ``c = x`` in the input dtype; and, when DIAGONAL
    (``offs_j == offs_i``: one operand), the raw fp32 ``||x_i||^2`` of the rows (zeros otherwise).

    Diagonal and off-diagonal tiles run this same loop (same operands' dtype, same BLOCK_D chunks, same
    instruction), so a dot product of two equal token vectors is the same fp32 value wherever it sits."""
    offs_d = tl.arange(0, BLOCK_D)
    xi_ptrs = x_row + offs_i.to(tl.int64)[:, None] * stride_xn
    xj_ptrs = x_row + offs_j.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    sq = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        d_mask = ds < D
        col = ds.to(tl.int64)[None, :] * stride_xd
        xi = tl.load(xi_ptrs + col, mask=mask_i[:, None] & d_mask[None, :], other=0.0)
        if DIAGONAL:
            sq += tl.sum(xi.to(tl.float32) * xi.to(tl.float32), axis=1)
        if CENTRE:
            mu = tl.load(mean_row + ds, mask=d_mask, other=0.0)
            ci = tl.where(mask_i[:, None], xi.to(tl.float32) - mu[None, :], 0.0)
        else:
            ci = xi
        if DIAGONAL:
            cj = ci
        else:
            xj = tl.load(xj_ptrs + col, mask=mask_j[:, None] & d_mask[None, :], other=0.0)
            if CENTRE:
                cj = tl.where(mask_j[:, None], xj.to(tl.float32) - mu[None, :], 0.0)
            else:
                cj = xj
        acc = tl.dot(ci, tl.trans(cj), acc, input_precision=INPUT_PRECISION)
    return acc, sq


@triton.jit
def _pairwise_distance_kernel(
    x_ptr,
    mean_ptr,
    gdiag_ptr,
    dist_ptr,
    norm_ptr,
    N,
    D,
    stride_xr,
    stride_xn,
    stride_xd,
    METRIC: tl.constexpr,
    CENTRE: tl.constexpr,
    DIAGONAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dist[r, i, j] = D(x[r, i], x[r, j]) fp32 (METRIC 0 euclidean, 1 cosine) from the Gram of the row.

    x: (rows, N, D) any strides; mean: (rows, D) fp32 row means (read when CENTRE: euclidean, fp32 inputs);
    gdiag: (rows, N) fp32 Gram diagonal ``G_ii``; dist: (rows, N, N) and norm: (rows, N) fp32 contiguous.
    DIAGONAL pass, grid (rows, cdiv(N, BLOCK_I)): program (r, b) computes the diagonal tile (b, b), stores
    its upper triangle mirrored, its diagonal ``G_ii`` into gdiag and the raw norms ``||x_i||_2``.
    Off-diagonal pass (after it), grid (rows, T, T): program (r, bi, bj) with bi < bj computes tile (bi, bj)
    and mirrors it to (bj, bi), reading ``G_ii``, ``G_jj`` from gdiag (programs with bi >= bj exit at once).
    """
    tl.static_assert(BLOCK_I == BLOCK_J)
    tl.static_assert(BLOCK_D >= 16)  # tl.dot needs K >= 16 for 16-bit operands
    row = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    if DIAGONAL:
        pid_j = pid_i
    else:
        pid_j = tl.program_id(2)
        if pid_i >= pid_j:  # the diagonal pass did bi == bj; the lower triangle is the mirror
            return
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < N
    mask_j = offs_j < N
    acc, sq = _gram_tile(x_ptr + row * stride_xr, mean_ptr + row * D, offs_i, offs_j, mask_i, mask_j, D,
                         stride_xn, stride_xd, CENTRE, DIAGONAL, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
    eye = offs_i[:, None] == offs_j[None, :]
    if DIAGONAL:
        # G_ii from the tile itself (a sum of one element and zeros: exact).
        g_i = tl.sum(tl.where(eye, acc, 0.0), axis=1)
        g_j = tl.sum(tl.where(eye, acc, 0.0), axis=0)
        tl.store(gdiag_ptr + row * N + offs_i, g_i, mask=mask_i)
        tl.store(norm_ptr + row * N + offs_i, tl.sqrt(sq), mask=mask_i)
    else:
        g_i = tl.load(gdiag_ptr + row * N + offs_i, mask=mask_i, other=0.0)
        g_j = tl.load(gdiag_ptr + row * N + offs_j, mask=mask_j, other=0.0)
    if METRIC == 0:
        # Equal tokens: G_ii = G_jj = G_ij bitwise, so (G + G) - 2 G = 0 exactly (also as one FMA).
        dist = tl.sqrt(tl.maximum((g_i[:, None] + g_j[None, :]) - 2.0 * acc, 0.0))
    else:
        inv_i = 1.0 / tl.maximum(tl.sqrt(g_i), 1e-8)
        inv_j = 1.0 / tl.maximum(tl.sqrt(g_j), 1e-8)
        dist = 1.0 - acc * (inv_i[:, None] * inv_j[None, :])
    dist = tl.where(eye, 0.0, dist)
    # Exactly symmetric: (i, j) with i <= j is computed once and mirrored to (j, i). Two-member clusters
    # then tie exactly (cost D[a, b] = D[b, a]) and go to the lower index, as in the reference.
    out = dist_ptr + row * N * N
    valid = mask_i[:, None] & mask_j[None, :]
    upper = offs_i[:, None] <= offs_j[None, :]
    tl.store(out + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], dist, mask=valid & upper)
    tl.store(out + offs_j.to(tl.int64)[None, :] * N + offs_i[:, None], dist,
             mask=valid & (offs_i[:, None] < offs_j[None, :]))


@triton.jit
def _argmax_lowest(v, offs, BLOCK: tl.constexpr):
    """Index of the maximum of ``v`` (int32 scalar); ties go to the lowest index."""
    top = tl.max(v, axis=0)
    return tl.min(tl.where(v == top, offs, BLOCK), axis=0)


@triton.jit
def _lane(vec, offs, i):
    """``vec[i]`` as a scalar (a masked sum: no cross-thread memory round trip)."""
    return tl.sum(tl.where(offs == i, vec, 0), axis=0)


@triton.jit
def _nearest(base, med, kofs, K, N, offs, valid, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) int32 ``argmin_k D[med[k], n]`` over k < K, lowest k on ties, ``k`` on a medoid's own lane;
    -1 on lanes >= N."""
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    assign = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k in range(0, K):
        m = _lane(med, kofs, k)
        d = tl.load(base + m.to(tl.int64) * N + offs, mask=valid, other=0.0)
        d = tl.where(offs == m, -float("inf"), d)  # a medoid token belongs to its own cluster
        better = d < best
        best = tl.where(better, d, best)
        assign = tl.where(better, k, assign)
    return tl.where(valid, assign, -1)


@triton.jit
def _medoids_kernel(
    dist_ptr,
    norm_ptr,
    med_ptr,
    assign_ptr,
    R,
    N,
    K,
    max_iters,
    chunk,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """KKZ + k-medoids iterations + sorted final assignment for the rows of one chunk.

    dist: (R, N, N) fp32, norm: (R, N) fp32 (from ``_pairwise_distance_kernel``); med: (R, K) int64 and
    assign: (R, N) int64 contiguous outputs (med also holds the current medoids between iterations).
    Grid: (cdiv(R, chunk),); program c owns rows [c chunk, min((c + 1) chunk, R)) and iterates them together
    until an iteration changes no row of the chunk, or max_iters iterations ran.
    """
    tl.static_assert(BLOCK_K <= BLOCK_N)
    pid = tl.program_id(0)
    r0 = pid * chunk
    r1 = tl.minimum(r0 + chunk, R)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    kofs = tl.arange(0, BLOCK_K)
    kvalid = kofs < K
    nn = N.to(tl.int64) * N

    # 1. KKZ initialisation.
    for r in range(r0, r1):
        base = dist_ptr + r * nn
        norms = tl.load(norm_ptr + r * N + offs, mask=valid, other=-float("inf"))
        m = _argmax_lowest(norms, offs, BLOCK_N)
        med = tl.where(kofs == 0, m, 0)
        run_min = tl.load(base + m.to(tl.int64) * N + offs, mask=valid, other=-float("inf"))
        # A chosen token leaves the running for good (-inf): the K medoids are distinct tokens.
        run_min = tl.where(offs == m, -float("inf"), run_min)
        for k in range(1, K):
            m = _argmax_lowest(run_min, offs, BLOCK_N)
            med = tl.where(kofs == k, m, med)
            d = tl.load(base + m.to(tl.int64) * N + offs, mask=valid, other=-float("inf"))
            run_min = tl.where(offs == m, -float("inf"), tl.minimum(run_min, d))
        tl.store(med_ptr + r * K + kofs, med.to(tl.int64), mask=kvalid)
    tl.debug_barrier()

    # 2. Alternating assignment / update until the chunk converges.
    it = 0
    while it < max_iters:
        changed = 0
        for r in range(r0, r1):
            base = dist_ptr + r * nn
            med_row = med_ptr + r * K
            med = tl.load(med_row + kofs, mask=kvalid, other=0).to(tl.int32)
            assign = _nearest(base, med, kofs, K, N, offs, valid, BLOCK_N)
            best_cost = tl.full((BLOCK_K,), float("inf"), dtype=tl.float32)
            best_idx = med
            for i in range(0, N):
                a_i = _lane(assign, offs, i)
                d = tl.load(base + i * N + offs, mask=valid, other=0.0)
                cost = tl.sum(tl.where(assign == a_i, d, 0.0), axis=0)
                upd = (kofs == a_i) & (cost < best_cost)
                best_cost = tl.where(upd, cost, best_cost)
                best_idx = tl.where(upd, i, best_idx)
            changed += tl.sum(((best_idx != med) & kvalid).to(tl.int32), axis=0)
            tl.debug_barrier()
            tl.store(med_row + kofs, best_idx.to(tl.int64), mask=kvalid)
            tl.debug_barrier()
        # A converged chunk jumps straight to the end (one loop-carried scalar: no register spill on sm_80).
        it = tl.where(changed > 0, it + 1, max_iters)

    # 3. Sort ascending (stable ranks) and assign to the sorted medoids.
    for r in range(r0, r1):
        base = dist_ptr + r * nn
        med_row = med_ptr + r * K
        med = tl.load(med_row + kofs, mask=kvalid, other=0).to(tl.int32)
        ordered = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k in range(0, K):
            mk = _lane(med, kofs, k)
            rank = tl.sum(((med < mk) & kvalid).to(tl.int32), axis=0)
            rank += tl.sum(((med == mk) & (kofs < k)).to(tl.int32), axis=0)
            ordered = tl.where(kofs == rank, mk, ordered)
        assign = _nearest(base, ordered, kofs, K, N, offs, valid, BLOCK_N)
        tl.debug_barrier()
        tl.store(med_row + kofs, ordered.to(tl.int64), mask=kvalid)
        tl.store(assign_ptr + r * N + offs, assign.to(tl.int64), mask=valid)


_INTERPRETED = is_interpreted(_medoids_kernel)


# --------------------------------------------------------------------------------------------
# Block-size policy
# --------------------------------------------------------------------------------------------


def kernel_configs(N: int, D: int, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """Launch configuration used for segments of ``N`` tokens of width ``D``, input ``dtype`` and fp32 dot
    ``precision`` ("ieee" or "tf32"; ignored for 16-bit inputs).

    Returns ``{"distance": {...}, "medoids": {...}}``: each kernel's block-size constexprs plus
    ``num_warps``/``num_stages``, exactly as the launcher passes them (both distance passes use the same
    one), so the AOT test compiles (and checks for spills and tensor-core instructions) what actually runs.
    Fixed table, no ``triton.autotune`` (that needs a GPU to benchmark):

    * distance: 64 x 64 Gram tiles on 4 warps (one warp group: sm_90 runs ``wgmma``), shrunk to
      ``next_pow2(N)`` (at least 16) for small segments; ``BLOCK_D`` = 32 input columns per ``tl.dot`` on
      the tensor-core paths (16-bit inputs, fp32 with "tf32"), 16 for fp32 "ieee" (FMA loops holding a
      thread's operand slices in registers); at least 16 (the ``tl.dot`` minimum), ``next_pow2(D)`` if smaller.
    * medoids: ``BLOCK_N = next_pow2(N)`` token lanes and ``BLOCK_K = BLOCK_N`` medoid lanes (K <= N, so
      one configuration per N whatever K); ``BLOCK_N / 32`` warps (1 to 8) up to 256 lanes, so one lane per
      thread, then ``BLOCK_N / 128`` (4 lanes per thread; 8 warps at 1024).
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {_SUPPORTED_DTYPES}")
    if precision not in INPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {INPUT_PRECISIONS}, got {precision!r}")
    n_pow2 = triton.next_power_of_2(max(int(N), 1))
    d_pow2 = triton.next_power_of_2(max(int(D), 1))
    tile = min(max(n_pow2, 16), 64)
    depth = 16 if (dtype == torch.float32 and precision == "ieee") else 32
    distance = dict(BLOCK_I=tile, BLOCK_J=tile, BLOCK_D=min(max(d_pow2, 16), depth), num_warps=4, num_stages=2)
    # One token lane per thread up to 256 lanes, four above: with two lanes per thread (256 on 4 warps,
    # 512 on 8) ptxas spilled the iteration counter on sm_80 (STACK 8).
    warps = max(1, min(n_pow2 // 32, 8)) if n_pow2 <= 256 else n_pow2 // 128
    medoids = dict(BLOCK_N=n_pow2, BLOCK_K=n_pow2, num_warps=warps, num_stages=1)
    return {"distance": distance, "medoids": medoids}


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check_launch(x, num_medoids, metric, max_iters, split_size):
    """The launch's invariants (see :mod:`clipfast.triton_kernels`): the tokens' shape, dtype and device, the
    sizes the kernels are launched with, and this kernel's token limit."""
    check_tensor(x, "x", 3, _SUPPORTED_DTYPES)
    check_launch_device(_INTERPRETED, x=x)
    n = x.shape[1]
    # A capability limit of this backend, not a re-validation: the backend is chosen by device and dtype, not by
    # N, so a user's valid x reaches it through clipfast.token_medoids, and an unsupported input is a ValueError.
    if n > MAX_TOKENS:
        raise ValueError(f"the Triton token_medoids kernel supports N <= {MAX_TOKENS} tokens per row, got {n}")
    check_int(num_medoids, "num_medoids", 1, n)
    check_int(max_iters, "max_iters", 0)
    check_int(split_size, "split_size", 0)
    torch._check(metric in _METRIC_ID, lambda: f"metric must be one of {METRICS}, got {metric!r}")


def _launch_distances(xs, dist, norms, gdiag, metric, precision, dcfg):
    """The two ``_pairwise_distance_kernel`` passes over the rows of ``xs`` into the scratch tensors."""
    rows, N, D = xs.shape
    # Euclidean distances are translation invariant: fp32 tokens are centred on their row's mean before
    # the Gram (less cancellation in G_ii + G_jj - 2 G_ij). 16-bit tokens stay as they are (exact products).
    centre = metric == "euclidean" and xs.dtype == torch.float32
    mean = torch.mean(xs, dim=1).contiguous() if centre else gdiag
    blocks = triton.cdiv(N, dcfg["BLOCK_I"])
    consts = dict(METRIC=_METRIC_ID[metric], CENTRE=centre, INPUT_PRECISION=precision, **dcfg)
    _pairwise_distance_kernel[(rows, blocks)](
        xs, mean, gdiag, dist, norms, N, D, xs.stride(0), xs.stride(1), xs.stride(2), DIAGONAL=True, **consts,
    )  # fmt: skip
    if blocks > 1:  # after the diagonal pass: the off-diagonal tiles read its G_ii
        _pairwise_distance_kernel[(rows, blocks, blocks)](
            xs, mean, gdiag, dist, norms, N, D, xs.stride(0), xs.stride(1), xs.stride(2), DIAGONAL=False, **consts,
        )  # fmt: skip


def _pairwise_distances(x, metric="euclidean", input_precision=None):
    """``(dist, norms)``: the (R, N, N) fp32 distance matrices and (R, N) raw token norms the medoid kernel
    reads (for tests)."""
    _check_launch(x, 1, metric, 0, 0)
    R, N, D = x.shape
    precision = resolve_input_precision(input_precision, x.dtype)
    dist = torch.empty((R, N, N), dtype=torch.float32, device=x.device)
    norms = torch.empty((R, N), dtype=torch.float32, device=x.device)
    gdiag = torch.empty((R, N), dtype=torch.float32, device=x.device)
    if R:
        _launch_distances(x, dist, norms, gdiag, metric, precision, kernel_configs(N, D, x.dtype, precision)["distance"])
    return dist, norms


def token_medoids_index_triton(x, num_medoids, metric="euclidean", max_iters=10, split_size=0, *,
                               input_precision=None):
    """k-medoids (KKZ init) of every row of tokens.

    Args:
        x: (R, N, D) float32/float16/bfloat16, any strides, CUDA (or CPU under the interpreter); N <= 1024.
        num_medoids: K, 1 <= K <= N.
        metric: "euclidean" or "cosine".
        max_iters: >= 0 assignment/update iterations at most.
        split_size: 0 for per-row convergence, s > 0 to iterate chunks of s consecutive rows together.
        input_precision: ``tl.dot`` precision of the distance tiles for fp32 inputs, "ieee" (exact fp32, FMA)
            or "tf32" (tensor cores); None (the default) follows PyTorch's float32 matmul precision
            (:func:`clipfast.backends.triton_input_precision`).
            16-bit inputs always multiply in their own dtype on the tensor cores.

    Returns:
        ``(medoid_index, assignment)``: (R, K) int64 ascending token indices, and (R, N) int64 indices into
        the sorted medoids.

    Raises:
        ValueError: N > MAX_TOKENS (this kernel's limit). RuntimeError: a broken launch invariant (arguments
        are validated by clipfast.token_medoids and the op, not here).
    """
    _check_launch(x, num_medoids, metric, max_iters, split_size)
    R, N, D = x.shape
    K = num_medoids
    medoid_index = torch.empty((R, K), dtype=torch.int64, device=x.device)
    assignment = torch.empty((R, N), dtype=torch.int64, device=x.device)
    if R == 0:
        return medoid_index, assignment
    precision = resolve_input_precision(input_precision, x.dtype)
    cfg = kernel_configs(N, D, x.dtype, precision)
    dcfg, mcfg = cfg["distance"], cfg["medoids"]
    chunk = split_size if split_size > 0 else 1
    group = max(chunk, (_SCRATCH_ELEMS // (N * N)) // chunk * chunk)
    group = min(group, triton.cdiv(R, chunk) * chunk)
    dist = torch.empty((min(group, R), N, N), dtype=torch.float32, device=x.device)
    norms = torch.empty((min(group, R), N), dtype=torch.float32, device=x.device)
    gdiag = torch.empty((min(group, R), N), dtype=torch.float32, device=x.device)
    for r0 in range(0, R, group):
        r1 = min(r0 + group, R)
        rows = r1 - r0
        _launch_distances(x[r0:r1], dist, norms, gdiag, metric, precision, dcfg)
        _medoids_kernel[(triton.cdiv(rows, chunk),)](
            dist, norms, medoid_index[r0:r1], assignment[r0:r1], rows, N, K, max_iters, chunk, **mcfg,
        )  # fmt: skip
    return medoid_index, assignment
