"""Triton token_medoids kernels against the reference (clipfast.reference.token_medoids).

The reference runs in float64 on the *same* (already rounded) inputs.

* MARGIN inputs: per row K well-separated centres ``5 * randn(D)``, each with two members at
  ``centre +- U[1, 2] * u`` (u a unit direction orthogonal to the centre, the two members on opposite
  sides), tokens permuted per row. KKZ then picks one token per cluster and one update makes every centre
  its cluster's medoid, by a margin of at least 1 (euclidean) in the in-cluster cost: the expected output
  is known exactly and the kernel must match it and the reference index for index (fp32 / fp16 / bf16,
  both metrics, split_size 0 and 2, non-contiguous inputs, large-norm tokens).
* Tie-breaks: duplicate tokens, where every argmax / argmin has exact ties, and two-token clusters, whose
  two in-cluster costs D[a, b] = D[b, a] tie exactly: the lowest index must win. (The kernel's distance
  matrices are exactly symmetric; the reference's are not, to an ulp, so the two-token case is checked
  against the known answer only.)
* General random inputs (no margin): the clustering objective (sum of float64 distances to the nearest
  medoid) must be within 1e-5 relative of the reference's, every medoid must be the argmin of its own
  cluster's in-cluster cost, and every token assigned to its nearest medoid (float64, 1e-5 relative
  slack: fp32 vs float64 distances may reorder near-ties). A few fixed-seed cases are also compared index
  for index (chunked stopping with small max_iters); their gaps are far above fp32 rounding.

The distance tiles are Gram products on ``tl.dot``; duplicate tokens get exact-zero distances only because each
dot output element is accumulated in the same order wherever it sits in the tile, as on a GPU. The
interpreter's BLAS-backed dot does not do that, so under the interpreter every test here runs inside
``gemm_work.position_independent_dot`` (an autouse fixture); ``test_distance_tiles_exact_zeros_and_symmetry``
checks the guarantees on the distance matrices themselves across several tiles, in every dtype path.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is unavailable), so shapes are small (R <= 8, N <= 64, D <= 32, K <= 12).
"""

import pytest
import torch

try:
    import triton
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.reference.token_medoids import distance_matrices, token_medoids_index_reference
from clipfast.triton_kernels import token_medoids as T

DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"
METRICS = ("euclidean", "cosine")


@pytest.fixture(autouse=True)
def _gpu_like_dot():
    """Under the interpreter, tl.dot rounds every output element as a GPU does (see the module docstring)."""
    if not triton.knobs.runtime.interpret:
        yield
        return
    from gemm_work import position_independent_dot

    with position_independent_dot():
        yield


def _run(x, k, metric, max_iters=100, split_size=0):
    m, a = T.token_medoids_index_triton(x.to(DEVICE), k, metric, max_iters, split_size)
    assert m.dtype == a.dtype == torch.int64
    assert m.shape == (x.shape[0], k) and a.shape == x.shape[:2]
    return m.cpu(), a.cpu()


def _reference(x, k, metric, max_iters=100, split_size=0):
    return token_medoids_index_reference(x.cpu().double(), k, metric, max_iters, split_size)


def _margin_inputs(rows, k, d, seed=0, centre_norm=None):
    """x (rows, 3k, d) fp32 and the expected (medoid_index, assignment) (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    xs, medoids, assigns = [], [], []
    for _ in range(rows):
        centres = 5 * torch.randn(k, d, generator=g, dtype=torch.float64)
        if centre_norm is not None:
            centres = centres / centres.norm(dim=1, keepdim=True) * centre_norm
        u = torch.randn(k, d, generator=g, dtype=torch.float64)
        unit_c = centres / centres.norm(dim=1, keepdim=True)
        u = u - (u * unit_c).sum(1, keepdim=True) * unit_c
        u = u / u.norm(dim=1, keepdim=True)
        radii = 1 + torch.rand(k, 2, generator=g, dtype=torch.float64)
        tokens = torch.cat([centres, centres + radii[:, :1] * u, centres - radii[:, 1:] * u])  # (3k, d)
        cluster = torch.arange(k).repeat(3)
        perm = torch.randperm(3 * k, generator=g)
        tokens, cluster = tokens[perm], cluster[perm]
        centre_pos = torch.argsort(perm)[:k]  # position of centre c after the permutation
        order = torch.argsort(centre_pos)  # sorted medoid slot -> cluster
        slot = torch.argsort(order)  # cluster -> sorted medoid slot
        xs.append(tokens)
        medoids.append(centre_pos[order])
        assigns.append(slot[cluster])
    x = torch.stack(xs).float()
    return x, torch.stack(medoids), torch.stack(assigns)


def _assert_margin(x, expected_m, expected_a, metric, split_size=0, dtype=torch.float32):
    k = expected_m.shape[1]
    m, a = _run(x, k, metric, split_size=split_size)
    ref_m, ref_a = _reference(x, k, metric, split_size=split_size)
    assert torch.equal(ref_m, expected_m) and torch.equal(ref_a, expected_a), "margin inputs: bad fixture"
    assert torch.equal(m, expected_m), f"{metric} {dtype} split={split_size}: medoids {m} != {expected_m}"
    assert torch.equal(a, expected_a), f"{metric} {dtype} split={split_size}: assignment differs"


@pytest.mark.parametrize("split_size", [0, 2])
@pytest.mark.parametrize("metric", METRICS)
def test_margin_inputs_exact(metric, split_size):
    x, em, ea = _margin_inputs(5, 6, 16, seed=1)
    _assert_margin(x, em, ea, metric, split_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_margin_inputs_low_precision(dtype):
    x, em, ea = _margin_inputs(3, 5, 32, seed=2)
    x = x.to(dtype)  # the centre stays its cluster's medoid after rounding (margin >= 1 >> rounding)
    m, a = _run(x, 5, "euclidean")
    ref_m, ref_a = _reference(x, 5, "euclidean")
    assert torch.equal(m, ref_m) and torch.equal(a, ref_a)
    assert torch.equal(m, em) and torch.equal(a, ea)


def test_margin_inputs_non_contiguous():
    x, em, ea = _margin_inputs(4, 4, 8, seed=3)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # token stride 1, feature stride N
    assert not xt.is_contiguous()
    _assert_margin(xt, em, ea, "euclidean", split_size=3)
    wide = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2])
    wide[..., ::2] = x
    _assert_margin(wide[..., ::2], em, ea, "cosine")  # feature stride 2


def test_large_norm_tokens_exact():
    """||x|| ~ 1000 (cluster radii 1 to 2): the fp32 Gram (tokens centred on their row's mean) keeps the
    in-cluster distances accurate enough for the margin."""
    x, em, ea = _margin_inputs(4, 8, 24, seed=4, centre_norm=1000.0)
    assert x.norm(dim=-1).min() > 990
    _assert_margin(x, em, ea, "euclidean")
    _assert_margin(x, em, ea, "euclidean", split_size=2)


@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_index(metric):
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(8, generator=g) for _ in range(3))
    b = b * 3  # largest norm
    # Duplicates everywhere: the max norm (b) at 1 and 4, clusters {a: 0, 3}, {b: 1, 4}, {c: 2, 5, 6}.
    x = torch.stack([a, b, c, a, b, c, c])[None]
    m, asg = _run(x, 3, metric)
    ref_m, ref_a = _reference(x, 3, metric)
    assert torch.equal(m, ref_m) and torch.equal(asg, ref_a)
    assert m.tolist() == [[0, 1, 2]]
    assert asg.tolist() == [[0, 1, 2, 0, 1, 2, 2]]

    # Two tokens, one duplicated: KKZ starts at the lower copy of the larger norm.
    x2 = torch.stack([a, a, b, b])[None]
    m2, a2 = _run(x2, 2, metric)
    assert m2.tolist() == [[0, 2]] and a2.tolist() == [[0, 0, 1, 1]]

    # All tokens identical and K = N: K distinct medoids all the same (a chosen token is never chosen
    # again, a medoid is its own cluster's member), whatever the sign of the cosine's rounding error.
    x3 = a.expand(1, 5, 8).contiguous()
    m3, a3 = _run(x3, 5, metric)
    ref_m3, ref_a3 = _reference(x3, 5, metric)
    assert m3.tolist() == ref_m3.tolist() == [[0, 1, 2, 3, 4]]
    assert a3.tolist() == ref_a3.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("metric", METRICS)
def test_more_medoids_than_distinct_tokens_are_distinct(metric):
    """Three distinct tokens, K = 5: the indices are still 5 distinct ascending tokens, as the reference's."""
    g = torch.Generator().manual_seed(11)
    a, b, c = (torch.randn(8, generator=g) for _ in range(3))
    x = torch.stack([a, b, a, c, b, a, c, a])[None]
    m, asg = _run(x, 5, metric)
    if metric == "euclidean":  # duplicates are exact zeros; cosine ones are rounding noise of either sign
        ref_m, ref_a = _reference(x, 5, metric)
        assert torch.equal(m, ref_m) and torch.equal(asg, ref_a)
    assert (m[0, 1:] > m[0, :-1]).all()
    assert torch.equal(asg[0, m[0]], torch.arange(5))


@pytest.mark.parametrize("metric", METRICS)
def test_two_member_clusters_tie_to_the_lower_index(metric):
    """Clusters {a, b}: cost(a) = D[a, b] = D[b, a] = cost(b) exactly, so the medoid is min(a, b)."""
    g = torch.Generator().manual_seed(6)
    rows, k, d = 3, 8, 16
    xs, expected = [], []
    for _ in range(rows):
        centres = 5 * torch.randn(k, d, generator=g, dtype=torch.float64)
        u = torch.randn(k, d, generator=g, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True) * (1 + torch.rand(k, 1, generator=g, dtype=torch.float64))
        tokens = torch.cat([centres + u, centres - 0.7 * u])
        perm = torch.randperm(2 * k, generator=g)
        pos = torch.argsort(perm)  # original token -> position
        xs.append(tokens[perm])
        expected.append(sorted(torch.minimum(pos[:k], pos[k:]).tolist()))
    x = torch.stack(xs).float()
    m, a = _run(x, k, metric)
    # Not compared with the reference: its distance matrices are not exactly symmetric (D[a, b] and D[b, a]
    # differ by an ulp: matmul rounding), so it breaks these exact ties by rounding, not by index.
    assert m.tolist() == expected
    dist = distance_matrices(x.double(), metric)
    for r in range(rows):  # the partner of each medoid joins it
        own = dist[r][m[r]].gather(0, a[r][None])[0]
        assert (own <= dist[r][m[r]].min(0).values + 1e-12).all()
        assert torch.equal(torch.bincount(a[r], minlength=k), torch.full((k,), 2))


@pytest.mark.parametrize("metric", METRICS)
def test_single_token_and_all_tokens(metric):
    x = torch.randn(3, 1, 7)
    m, a = _run(x, 1, metric)
    assert m.tolist() == [[0]] * 3 and a.tolist() == [[0]] * 3

    x = torch.randn(2, 9, 12)  # distinct tokens, K = N: every token is its own medoid
    m, a = _run(x, 9, metric, split_size=2)
    assert torch.equal(m, torch.arange(9).expand(2, 9)) and torch.equal(a, torch.arange(9).expand(2, 9))


def _objective(dist, medoids):
    """(R,) float64 sum over tokens of the distance to the nearest medoid."""
    rows = torch.arange(dist.shape[0])[:, None]
    return dist[rows, medoids].min(dim=1).values.sum(-1)


def _check_general(x, k, metric, max_iters=100, split_size=0, converged=True):
    m, a = _run(x, k, metric, max_iters, split_size)
    ref_m, _ = _reference(x, k, metric, max_iters, split_size)
    dist = distance_matrices(x.double(), metric)  # (R, N, N) float64
    assert (m[:, 1:] >= m[:, :-1]).all(), "medoids not sorted"
    obj, ref_obj = _objective(dist, m), _objective(dist, ref_m)
    torch.testing.assert_close(obj, ref_obj, rtol=1e-5, atol=1e-9)
    for r in range(x.shape[0]):
        dm = dist[r][m[r]]  # (K, N) distances to the sorted medoids
        nearest = dm.min(0).values
        assert (dm.gather(0, a[r][None])[0] <= nearest + 1e-5 * nearest.max()).all(), "not nearest medoid"
        if converged and len(set(m[r].tolist())) == k:  # a medoid is its final cluster's argmin at convergence
            for c in range(k):
                members = (a[r] == c).nonzero()[:, 0]
                costs = dist[r][members][:, members].sum(1)
                own = dist[r][m[r, c]][members].sum()
                assert own <= costs.min() * (1 + 1e-5) + 1e-9, f"row {r}: medoid {c} is not its cluster's argmin"
    return m, a, ref_m


@pytest.mark.parametrize(
    "rows,n,d,k,split_size",
    [(4, 37, 24, 5, 0), (5, 64, 32, 12, 2), (3, 20, 8, 12, 0)],
)
@pytest.mark.parametrize("metric", METRICS)
def test_general_inputs_objective(metric, rows, n, d, k, split_size):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, n, d, generator=g)
    _check_general(x, k, metric, split_size=split_size)


@pytest.mark.parametrize("max_iters,split_size", [(0, 0), (1, 0), (2, 3), (3, 2)])
def test_general_inputs_iteration_limits_exact(max_iters, split_size):
    """Small max_iters and chunked stopping: fixed seeds whose gaps are far above fp32 rounding."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 30, 16, generator=g)
    m, a, ref_m = _check_general(x, 4, "euclidean", max_iters, split_size, converged=False)
    ref_m, ref_a = _reference(x, 4, "euclidean", max_iters, split_size)
    assert torch.equal(m, ref_m) and torch.equal(a, ref_a)


def test_row_groups_and_chunks(monkeypatch):
    """Several launches of row groups (a tiny scratch budget) give the single-launch result."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 12, 8, generator=g)
    expected = {s: _run(x, 3, "cosine", 100, s) for s in (0, 3)}
    monkeypatch.setattr(T, "_SCRATCH_ELEMS", 2 * 12 * 12)
    for s, (em, ea) in expected.items():
        m, a = _run(x, 3, "cosine", 100, s)
        assert torch.equal(m, em) and torch.equal(a, ea)


def test_input_validation():
    """User arguments are validated by clipfast.token_medoids and the op; a direct caller that breaks the
    launcher's invariants gets a RuntimeError, never an out-of-bounds launch."""
    x = torch.randn(2, 5, 4, device=DEVICE)
    f = T.token_medoids_index_triton
    with pytest.raises(RuntimeError, match=r"x must be a 3-D tensor .*, got \(5, 4\)"):
        f(x[0], 2, "euclidean", 10, 0)
    with pytest.raises(RuntimeError, match=r"x must be a 3-D tensor of dtype torch.float32 or torch.float16 or "
                                           r"torch.bfloat16, got \(2, 5, 4\) torch.float64"):
        f(x.double(), 2, "euclidean", 10, 0)
    with pytest.raises(RuntimeError, match=r"x must be a 3-D tensor of dtype .*, got \(2, 5, 4\) torch.int32"):
        f(x.to(torch.int32), 2, "euclidean", 10, 0)
    for k in (0, 6):
        with pytest.raises(RuntimeError, match=rf"num_medoids must be an int in \[1, 5\], got {k}"):
            f(x, k, "euclidean", 10, 0)
    with pytest.raises(RuntimeError, match="metric must be one of .*, got 'manhattan'"):
        f(x, 2, "manhattan", 10, 0)
    with pytest.raises(RuntimeError, match=r"max_iters must be an int >= 0, got -1"):
        f(x, 2, "euclidean", -1, 0)
    with pytest.raises(RuntimeError, match=r"split_size must be an int >= 0, got -2"):
        f(x, 2, "euclidean", 10, -2)
    with pytest.raises(RuntimeError, match=r"num_medoids must be an int in \[1, 5\], got 2.0"):
        f(x, 2.0, "euclidean", 10, 0)
    with pytest.raises(RuntimeError, match="x must be a 3-D tensor .*, got list"):
        f(x.tolist(), 2, "euclidean", 10, 0)
    m, a = f(x[:0], 2, "euclidean", 10, 0)  # no rows
    assert m.shape == (0, 2) and a.shape == (0, 5)


def test_kernel_configs():
    for n in (1, 50, 147, 294, 1024):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cfg = T.kernel_configs(n, 768, dtype)
            assert set(cfg) == {"distance", "medoids"}
            assert cfg["medoids"]["BLOCK_N"] >= n and cfg["medoids"]["BLOCK_K"] == cfg["medoids"]["BLOCK_N"]
    with pytest.raises(TypeError):
        T.kernel_configs(50, 768, torch.float64)


# (dtype, fp32 dot precision) of every distance-tile path.
PATHS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")]


@pytest.mark.parametrize("dtype,precision", PATHS, ids=["fp32-ieee", "fp32-tf32", "fp16", "bf16"])
def test_distance_tiles_exact_zeros_and_symmetry(dtype, precision):
    """N = 150 over three 64-token blocks, duplicates in every block: every distance matrix is exactly
    symmetric, euclidean duplicates are exactly 0 (G_ii, G_jj and G_ij are the same dot), and both metrics
    are within their path's rounding of the float64 distances of the same (rounded) tokens."""
    from contextlib import nullcontext

    g = torch.Generator().manual_seed(12)
    n, d = 150, 40
    base = 3 * torch.randn(20, d, generator=g) + 5  # a shared offset: the centring matters
    which = torch.randint(0, 20, (2, n), generator=g)
    x = base[which].to(dtype)
    same = which[:, :, None] == which[:, None, :]
    tol = {"ieee": 1e-5, "tf32": 4e-3}[precision] if dtype == torch.float32 else 1e-5
    tf32 = nullcontext
    if precision == "tf32" and triton.knobs.runtime.interpret:
        from gemm_work import emulate_tf32_dot as tf32
    for metric in METRICS:
        with tf32():
            dist, norms = T._pairwise_distances(x.to(DEVICE), metric, precision)
        dist, norms = dist.cpu(), norms.cpu()
        assert torch.equal(dist, dist.transpose(1, 2)), metric
        assert (dist.diagonal(dim1=1, dim2=2) == 0).all()
        ref = distance_matrices(x.double(), metric)
        scale = ref.amax() if metric == "euclidean" else 1.0
        assert (dist.double() - ref).abs().max() <= tol * scale * 8, metric
        torch.testing.assert_close(norms.double(), x.double().norm(dim=-1), rtol=1e-6, atol=0)
        if metric == "euclidean":
            assert (dist[same] == 0).all(), "duplicate tokens at a nonzero distance"
        else:  # cosine: 1 - G_ij / (||x_i|| ||x_j||) of duplicates is rounding noise of either sign
            assert dist[same].abs().max() <= 4e-7


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="counts tl.dot calls of the Triton interpreter")
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.bfloat16, "ieee")], ids=["fp32-ieee", "fp32-tf32", "bf16"])
def test_gemm_work(dtype, precision):
    """The module docstring's count: per row and metric, the distance tiles execute (T + 1) / 2T Gram
    GEMM-equivalents on tl.dot (each tile on or above the diagonal once; N and D padded to whole blocks);
    the medoid iterations execute none."""
    from gemm_work import count_dot_flops

    rows, n, d = 2, 100, 40
    x = torch.randn(rows, n, d).to(dtype)
    cfg = T.kernel_configs(n, d, dtype, precision)["distance"]
    b, bd = cfg["BLOCK_I"], cfg["BLOCK_D"]
    t = triton.cdiv(n, b)
    assert (b, t) == (64, 2) and bd == (16 if precision == "ieee" and dtype == torch.float32 else 32)
    n_pad, d_pad = t * b, triton.cdiv(d, bd) * bd
    with count_dot_flops() as work:
        T.token_medoids_index_triton(x, 4, "euclidean", 100, 0, input_precision=precision)
        T.token_medoids_index_triton(x, 4, "cosine", 100, 0, input_precision=precision)
    steps = 2 * rows * (t * (t + 1) // 2) * (d_pad // bd)  # metrics x rows x tiles x D chunks
    assert work.by_shape == {(b, bd, b): steps}
    assert work.flops == steps * 2 * b * bd * b
    assert work.gemm_equivalents(n_pad, d_pad, n_pad) == 2 * rows * (t + 1) / (2 * t)  # 3/4 per row and metric
