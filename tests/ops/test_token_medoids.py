"""Token medoids (CenterCLIP k-medoids) through every backend that runs here, against the reference.

Exact index equality is asserted only on margin inputs (well-separated centres, each the unique
medoid of its cluster by a clear margin, tokens permuted per row): near-ties make index comparisons
between differently rounded distance matrices meaningless. General inputs are checked through the
objective and the medoid property.
"""

import numpy as np
import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.token_medoids import distance_matrices, token_medoids_index_reference

CPU_BACKENDS = [b for b in backends.available_backends("token_medoids", "cpu")]


def margin_tokens(rows, k, dim, scale=5.0, seed=0, dtype=torch.float32):
    """Per row: k centres scale * N(0, I), each with 2 members at distance U[1, 2] in random directions
    (in high dimension the centre is its cluster's unique medoid by a margin); tokens permuted.
    Returns (x (rows, 3k, dim), true sorted medoid positions (rows, k))."""
    g = torch.Generator().manual_seed(seed)
    xs, truths = [], []
    for _ in range(rows):
        centres = scale * torch.randn(k, dim, generator=g, dtype=torch.float64)
        parts = [centres]
        for _ in range(2):
            u = torch.nn.functional.normalize(torch.randn(k, dim, generator=g, dtype=torch.float64), dim=-1)
            parts.append(centres + u * (1 + torch.rand(k, 1, generator=g, dtype=torch.float64)))
        perm = torch.randperm(3 * k, generator=g)
        xs.append(torch.cat(parts)[perm])
        truths.append(torch.sort(torch.argsort(perm)[:k]).values)
    return torch.stack(xs).to(dtype), torch.stack(truths)


def objective(x, index, metric):
    """Sum over tokens of the distance to the nearest medoid, float64."""
    dist = distance_matrices(x.double(), metric)
    return torch.gather(dist, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[1])).min(1).values.sum().item()


@pytest.mark.parametrize("split_size", [None, 2], ids=["per_row", "chunked"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_margin_inputs_exact(backend, metric, split_size):
    rows, k, dim = (3, 5, 64) if backend == "triton" else (8, 16, 128)
    x, truth = margin_tokens(rows, k, dim)
    with clipfast.use_backend(backend):
        medoids, index, assignment = clipfast.token_medoids(x, k, metric=metric, split_size=split_size)
    ref_index, ref_assignment = token_medoids_index_reference(x.double(), k, metric, 100, split_size or 0)
    assert torch.equal(index, ref_index)
    assert torch.equal(assignment, ref_assignment)
    if metric == "euclidean":
        assert torch.equal(index, truth)
    assert torch.equal(medoids, torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, dim)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_norm_tokens_stay_exact_in_fp32(backend):
    """Tokens of norm ~1000: ||a||^2 + ||b||^2 - 2 a.b on raw tokens would cancel in fp32."""
    rows, k, dim = (2, 4, 64) if backend == "triton" else (6, 12, 128)
    x, truth = margin_tokens(rows, k, dim, scale=5.0, seed=3)
    x = x + 120.0 * torch.randn(rows, 1, dim, generator=torch.Generator().manual_seed(4))  # shared large offset
    assert x.norm(dim=-1).min() > 500
    with clipfast.use_backend(backend):
        _, index, _ = clipfast.token_medoids(x, k)
    assert torch.equal(index, truth)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tie_break_lowest_index(backend):
    """Duplicated tokens: identical candidates, the lowest index must win everywhere."""
    base = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).unsqueeze(0)
    with clipfast.use_backend(backend):
        _, index, assignment = clipfast.token_medoids(base, 2)
    want_index, want_assignment = token_medoids_index_reference(base, 2, "euclidean", 100, 0)
    assert torch.equal(index, want_index) and torch.equal(assignment, want_assignment)
    assert index.tolist() == [[1, 2]] or index.tolist() == want_index.tolist()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_more_medoids_than_distinct_tokens_gives_distinct_indices(backend, metric):
    """K larger than the number of distinct tokens: K distinct ascending indices, each medoid its own
    cluster's member; all tokens equal and K = N gives every index."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(6, generator=g) for _ in range(3))
    x = torch.stack([torch.stack([a, b, a, c, b, a, c, a]), torch.stack([a] * 8)])
    with clipfast.use_backend(backend):
        _, index, assignment = clipfast.token_medoids(x, 5, metric=metric)
        _, every, every_assignment = clipfast.token_medoids(x, 8, metric=metric)
    if metric == "euclidean":  # duplicates are exact zeros; cosine ones are rounding noise of either sign
        want_index, want_assignment = token_medoids_index_reference(x, 5, metric, 100, 0)
        assert torch.equal(index, want_index) and torch.equal(assignment, want_assignment)
    assert (index[:, 1:] > index[:, :-1]).all(), index
    for r in range(2):
        assert torch.equal(assignment[r, index[r]], torch.arange(5))
    assert torch.equal(every, torch.arange(8).expand(2, 8)) and torch.equal(every_assignment, every)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_tokens_raise(backend, bad):
    """Indices cannot carry a NaN: one non-finite token raises instead of a valid-looking answer."""
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(4))
    x[1, 3, 2] = bad
    with clipfast.use_backend(backend), pytest.raises(ValueError, match="NaN or Inf"):
        clipfast.token_medoids(x, 5)
    with clipfast.use_backend(backend), pytest.raises(ValueError, match="NaN or Inf"):
        clipfast.segment_medoids(x.reshape(2, 9, 4), 1, 1, 3)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's NumPy
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_finite_tokens_whose_squares_overflow_do_not_raise(backend):
    """The C++ kernel flags a token by its squared norm: one that overflows fp32 has its elements checked,
    and finite elements pass (as the op's separate check does for the other backends)."""
    x = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(5))
    x[2, 4] = 1e30
    with clipfast.use_backend(backend):
        _, index, assignment = clipfast.token_medoids(x, 5)
    assert (index[:, 1:] > index[:, :-1]).all() and assignment.shape == (3, 9), index


def test_non_finite_tokens_raise_under_compile():
    compiled = torch.compile(lambda t: clipfast.token_medoids(t, 2)[0], backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 4)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compiled(x)


def test_integer_like_arguments():
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(8))
    _, want, _ = clipfast.token_medoids(x, 3, max_iters=5, split_size=2)
    for k, iters, split in ((np.int64(3), np.int32(5), np.int64(2)), (torch.tensor(3), torch.tensor(5), torch.tensor(2))):
        _, index, _ = clipfast.token_medoids(x, k, max_iters=iters, split_size=split)
        assert torch.equal(index, want)
    out = clipfast.segment_medoids(x, np.int64(2), torch.tensor(1), np.int64(3), num_prefix_tokens=np.int8(1))
    assert out.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="num_medoids"):
        clipfast.token_medoids(x, 3.0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_general_inputs_objective_and_medoid_property(backend, metric):
    rows, n, dim, k = (2, 40, 16, 6) if backend == "triton" else (12, 147, 96, 49)
    x = torch.randn(rows, n, dim, generator=torch.Generator().manual_seed(5))
    with clipfast.use_backend(backend):
        _, index, assignment = clipfast.token_medoids(x, k, metric=metric)
    ref_index, _ = token_medoids_index_reference(x, k, metric, 100, 0)
    assert abs(objective(x, index, metric) - objective(x, ref_index, metric)) <= 1e-5 * objective(x, ref_index, metric)
    dist = distance_matrices(x.double(), metric)
    for r in range(rows):
        for c in range(k):
            members = (assignment[r] == c).nonzero().flatten()
            costs = dist[r][members][:, members].sum(1)
            chosen = costs[members.tolist().index(index[r, c].item())]
            # the medoid is a least-cost member (up to fp32-vs-fp64 rounding of exact ties)
            assert chosen <= costs.min() + 1e-5 * max(1.0, costs.min().item()), (r, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_sizes(backend):
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(6))
    with clipfast.use_backend(backend):
        _, one, _ = clipfast.token_medoids(x[:, :1], 1)
        _, every, assignment = clipfast.token_medoids(x, 7)
    assert torch.equal(one, torch.zeros(3, 1, dtype=torch.int64))
    assert torch.equal(every, torch.arange(7).expand(3, 7)) and torch.equal(assignment, torch.arange(7).expand(3, 7))


def test_gradients_flow_to_the_chosen_tokens():
    x = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    medoids, index, _ = clipfast.token_medoids(x, 3)
    (grad,) = torch.autograd.grad(medoids.sum(), x)
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen.scatter_(1, index, True)
    assert torch.equal(grad[chosen], torch.ones_like(grad[chosen])) and grad[~chosen].abs().max() == 0
    assert torch.autograd.gradcheck(lambda t: clipfast.token_medoids(t, 3)[0], (x,))


def test_segment_medoids_matches_a_plain_composition():
    videos, frames, segments, patches, dim, k = 2, 6, 3, 9, 16, 5
    tokens = torch.randn(videos * frames, 1 + patches, dim, generator=torch.Generator().manual_seed(7),
                         requires_grad=True)
    out = clipfast.segment_medoids(tokens, frames, segments, k)
    per = frames // segments
    want = []
    for b in range(videos):
        for s in range(segments):
            seg = tokens[b * frames + s * per: b * frames + (s + 1) * per]
            cls = seg[:, :1].mean(0)
            flat = seg[:, 1:].reshape(1, per * patches, dim)
            idx, _ = token_medoids_index_reference(flat.detach(), k, "euclidean", 100, 0)
            want.append(torch.cat([cls, flat[0, idx[0]]]))
    torch.testing.assert_close(out, torch.stack(want), rtol=0, atol=0)
    assert out.shape == (videos * segments, 1 + k, dim)
    torch.autograd.grad(out.sum(), tokens)


def test_compile_fullgraph():
    x = torch.randn(4, 20, 8, requires_grad=True)

    def fn(t):
        medoids, _, _ = clipfast.token_medoids(t, 5)
        return medoids.square().sum()

    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(fn(x), x)[0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(2, 5, 3), num_medoids=6), ValueError, "num_medoids"),
    (dict(x=torch.randn(2, 5, 3), num_medoids=0), ValueError, "num_medoids"),
    (dict(x=torch.randn(5, 3), num_medoids=2), ValueError, "rows, tokens, dim"),
    (dict(x=torch.ones(2, 5, 3, dtype=torch.int64), num_medoids=2), TypeError, "float"),
    (dict(x=torch.randn(2, 5, 3), num_medoids=2, metric="l1"), ValueError, "metric"),
    (dict(x=torch.randn(2, 5, 3), num_medoids=2, split_size=0), ValueError, "split_size"),
])
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        clipfast.token_medoids(**kwargs)


def test_native_kernel_asserts_its_invariants():
    """clipfast.token_medoids validates user input; the native kernel asserts the sizes it indexes by."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"native CPU kernels unavailable: {backends.native_load_error}")
    with pytest.raises(RuntimeError, match=r"(?s)INTERNAL ASSERT FAILED.*num_medoids 6 outside \[1, 5\]"):
        torch.ops.clipfast_C.token_medoids_index(torch.randn(2, 5, 3), 6, "euclidean", 10, 0)


def test_segment_bad_inputs():
    with pytest.raises(ValueError, match="not divisible"):
        clipfast.segment_medoids(torch.randn(12, 10, 4), 6, 4, 3)
    with pytest.raises(ValueError, match="whole number of videos"):
        clipfast.segment_medoids(torch.randn(13, 10, 4), 6, 3, 3)
