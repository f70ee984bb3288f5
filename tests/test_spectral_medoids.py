"""Spectral token medoids, tested by properties.

Exact indices are not asserted: the eigenvectors are defined up to sign and rotation, the rows of a
well-separated group land almost on one point of the embedding, and the medoid inside such a group is
a near-tie that rounding decides. What is asserted: a valid clustering, the medoid property in the
embedding, the recovered partition of separated data, its invariance to token order, the kNN graph,
the gradient path, the documented underflow regime and the input checks.
"""

import pytest
import torch

from clipfast.reference.token_medoids import distance_matrices
from clipfast.spectral_medoids import heat_kernel_affinity, spectral_embedding, spectral_token_medoids


def blobs(rows, sizes, dim, *, centre_scale, spread, seed, unit_centres=False, dtype=torch.float32):
    """Per row: one blob per entry of ``sizes``, members = centre + spread * N(0, I), tokens permuted.
    Centres are ``centre_scale * N(0, I)``, or random unit vectors when ``unit_centres``.
    Returns (x (rows, sum(sizes), dim), labels (rows, sum(sizes)) blob of each token)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    labels = torch.cat([torch.full((s,), b) for b, s in enumerate(sizes)])
    xs, ys = [], []
    for _ in range(rows):
        centres = torch.randn(len(sizes), dim, generator=g, dtype=torch.float64)
        centres = torch.nn.functional.normalize(centres, dim=-1) if unit_centres else centre_scale * centres
        points = centres[labels] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)
        perm = torch.randperm(n, generator=g)
        xs.append(points[perm])
        ys.append(labels[perm])
    return torch.stack(xs).to(dtype), torch.stack(ys)


# (blob generator kwargs, sigma): raw-scale separated blobs with a sigma for the data, and features of
# norm ~1 with the default sigma = 2 (a dense, far from block-diagonal graph: W ~ 0.78 between blobs).
SEPARATED = {
    "far_blobs": (dict(centre_scale=4.0, spread=0.3), 1.0),
    "unit_norm": (dict(centre_scale=None, spread=0.02, unit_centres=True), 2.0),
}
SIZES = (6, 9, 12, 5)


def partition(assignment_row):
    """The clusters of one row as a set of frozensets of token positions."""
    return {frozenset((assignment_row == c).nonzero().flatten().tolist()) for c in assignment_row.unique()}


def assert_valid_clustering(x, k, medoids, index, assignment):
    rows, n, dim = x.shape
    assert index.shape == (rows, k) and index.dtype == torch.int64
    assert assignment.shape == (rows, n) and assignment.dtype == torch.int64
    assert medoids.shape == (rows, k, dim) and medoids.dtype == x.dtype
    assert bool((index[:, 1:] > index[:, :-1]).all()), "indices strictly ascending (so unique)"
    assert int(index.min()) >= 0 and int(index.max()) < n
    assert int(assignment.min()) >= 0 and int(assignment.max()) < k
    counts = torch.zeros(rows, k, dtype=torch.int64).scatter_add_(1, assignment, torch.ones_like(assignment))
    assert bool((counts > 0).all()), "every cluster non-empty"
    assert torch.equal(torch.gather(assignment, 1, index), torch.arange(k).expand(rows, k)), \
        "each medoid belongs to its own cluster"
    assert torch.equal(medoids, torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, dim)))


@pytest.mark.parametrize("num_neighbors", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_valid_clustering_and_medoid_property(dtype, num_neighbors):
    """Each medoid is the exact argmin, lowest index first, of the total embedding distance to its
    cluster's members, under the distance formula of the k-medoids."""
    rows, n, dim, k = 4, 40, 8, 5
    x = torch.randn(rows, n, dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
    medoids, index, assignment = spectral_token_medoids(x, k, num_neighbors=num_neighbors, sigma=2.0)
    assert_valid_clustering(x, k, medoids, index, assignment)
    embedding = spectral_embedding(x, k, num_neighbors=num_neighbors, sigma=2.0)
    dist = distance_matrices(embedding, "euclidean")
    for r in range(rows):
        for c in range(k):
            members = (assignment[r] == c).nonzero().flatten()
            costs = dist[r][members][:, members].sum(1)
            assert members[int(torch.argmin(costs))] == index[r, c], (r, c)


@pytest.mark.parametrize("num_neighbors", [None, 4])
@pytest.mark.parametrize("regime", sorted(SEPARATED))
def test_separated_blobs_are_the_clusters(regime, num_neighbors):
    kwargs, sigma = SEPARATED[regime]
    x, labels = blobs(3, SIZES, 32, seed=2, **kwargs)
    medoids, index, assignment = spectral_token_medoids(x, len(SIZES), num_neighbors=num_neighbors, sigma=sigma)
    assert_valid_clustering(x, len(SIZES), medoids, index, assignment)
    for r in range(x.shape[0]):
        assert partition(assignment[r]) == partition(labels[r]), r


@pytest.mark.parametrize("num_neighbors", [None, 4])
@pytest.mark.parametrize("regime", sorted(SEPARATED))
def test_partition_invariant_to_token_order(regime, num_neighbors):
    """Permuting the tokens permutes the clusters' members and nothing else. The medoid inside a cluster
    may move: its members sit almost on one point of the embedding, so the least-cost member is a
    near-tie that the eigensolver's rounding (and the lowest-index rule) decides."""
    kwargs, sigma = SEPARATED[regime]
    x, _ = blobs(3, SIZES, 32, seed=3, **kwargs)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(4))
    _, index, assignment = spectral_token_medoids(x, len(SIZES), num_neighbors=num_neighbors, sigma=sigma)
    _, index_p, assignment_p = spectral_token_medoids(x[:, perm], len(SIZES), num_neighbors=num_neighbors,
                                                      sigma=sigma)
    for r in range(x.shape[0]):
        # token p of the permuted row is token perm[p] of the original one
        mapped = {frozenset(perm[list(c)].tolist()) for c in partition(assignment_p[r])}
        assert mapped == partition(assignment[r]), r
        chosen = set(perm[index_p[r]].tolist())
        assert all(len(chosen & c) == 1 for c in mapped), "one medoid per cluster in either order"


def test_embedding_matches_the_dense_laplacian():
    """Against the textbook construction (diag matrices, direct distances, float64). Eigenvectors are
    compared through the Gram matrix of the normalised rows, ``S Q Q^T S``: Q Q^T is the projector on the
    bottom eigenspace, independent of signs and rotations wherever that eigenspace is separated from the
    rest of the spectrum, as it is for separated blobs."""
    kwargs, sigma = SEPARATED["far_blobs"]
    x, _ = blobs(2, SIZES, 16, seed=5, dtype=torch.float64, **kwargs)
    k = len(SIZES)
    embedding = spectral_embedding(x, k, sigma=sigma)
    assert embedding.shape == (2, x.shape[1], k) and embedding.dtype == torch.float64
    w = torch.exp(-(x[:, :, None] - x[:, None, :]).square().sum(-1) / (2 * sigma ** 2))
    d_inv_sqrt = torch.diag_embed(w.sum(-1) ** -0.5)
    laplacian = torch.eye(x.shape[1], dtype=x.dtype) - d_inv_sqrt @ w @ d_inv_sqrt
    q = torch.linalg.eigh(laplacian).eigenvectors[..., :k]
    q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(embedding @ embedding.transpose(1, 2), q @ q.transpose(1, 2), rtol=0, atol=1e-9)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-5)
    embedding32 = spectral_embedding(x.float(), k, sigma=sigma)
    assert embedding32.dtype == torch.float32
    torch.testing.assert_close((embedding32 @ embedding32.transpose(1, 2)).double(), q @ q.transpose(1, 2),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_graph_is_symmetric_or_of_both_neighbourhoods(dtype):
    x = torch.randn(3, 30, 6, generator=torch.Generator().manual_seed(6), dtype=dtype)
    k = 4
    dense = heat_kernel_affinity(x, sigma=2.0)
    knn = heat_kernel_affinity(x, num_neighbors=k, sigma=2.0)
    assert torch.equal(dense, dense.transpose(1, 2)) and torch.equal(knn, knn.transpose(1, 2))
    assert torch.equal(torch.diagonal(knn, dim1=1, dim2=2), torch.ones(3, 30, dtype=dtype))
    others = dense - torch.eye(30, dtype=dtype)  # the diagonal never counts among the neighbours
    kth = others.topk(k, dim=-1).values[..., -1:]
    in_row = dense >= kth
    want = torch.where(in_row | in_row.transpose(1, 2), dense, torch.zeros((), dtype=dtype))
    assert torch.equal(knn, want)
    kept = (knn > 0).sum(-1) - 1
    assert bool((kept >= k).all()) and bool((kept < 29).any()), "at least k neighbours, yet sparser than dense"
    medoids, index, assignment = spectral_token_medoids(x, 5, num_neighbors=k, sigma=2.0)
    assert_valid_clustering(x, 5, medoids, index, assignment)


def test_knn_keeps_every_tie_at_the_kth_value():
    """Token 0 is equidistant from tokens 1, 2 and 3: with one neighbour it keeps all three."""
    x = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]]])
    knn = heat_kernel_affinity(x, num_neighbors=1, sigma=2.0)
    assert (knn[0, 0, :4] > 0).all() and knn[0, 0, 4] == 0
    assert torch.equal(knn, knn.transpose(1, 2))


def test_gradient_reaches_the_chosen_tokens_only():
    x = torch.randn(2, 24, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64, requires_grad=True)
    medoids, index, _ = spectral_token_medoids(x, 4, sigma=2.0)
    assert not spectral_embedding(x, 4).requires_grad
    (grad,) = torch.autograd.grad(medoids.sum(), x)
    chosen = torch.zeros(2, 24, dtype=torch.bool).scatter_(1, index, True)
    assert torch.equal(grad[chosen], torch.ones_like(grad[chosen]))
    assert torch.equal(grad[~chosen], torch.zeros_like(grad[~chosen]))


def test_scale_trap_still_returns_a_valid_clustering():
    """iid N(0, 1) 768-d tokens with sigma = 2: ||x_i - x_j||^2 ~ 1536, exp(-192) underflows in float32,
    W = I and L = 0. The embedding is arbitrary but the clustering stays valid; unit-norm tokens avoid it."""
    x = torch.randn(2, 49, 768, generator=torch.Generator().manual_seed(8))
    assert torch.equal(heat_kernel_affinity(x, sigma=2.0), torch.eye(49).expand(2, 49, 49))
    assert torch.equal(heat_kernel_affinity(x, num_neighbors=5, sigma=2.0), torch.eye(49).expand(2, 49, 49))
    assert torch.isfinite(spectral_embedding(x, 7)).all()
    for num_neighbors in (None, 5):
        medoids, index, assignment = spectral_token_medoids(x, 7, num_neighbors=num_neighbors)
        assert_valid_clustering(x, 7, medoids, index, assignment)
    unit = torch.nn.functional.normalize(x, dim=-1)
    assert bool((heat_kernel_affinity(unit, sigma=2.0) > 0.5).all())


def test_edge_sizes():
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(9))
    _, one, assignment = spectral_token_medoids(x, 1)
    assert one.shape == (3, 1) and torch.equal(assignment, torch.zeros(3, 7, dtype=torch.int64))
    _, every, assignment = spectral_token_medoids(x, 7)
    assert torch.equal(every, torch.arange(7).expand(3, 7)) and torch.equal(assignment, torch.arange(7).expand(3, 7))
    medoids, index, assignment = spectral_token_medoids(x[:, :2], 2, num_neighbors=1)
    assert_valid_clustering(x[:, :2], 2, medoids, index, assignment)


X = torch.randn(2, 6, 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=X.numpy(), num_medoids=2), TypeError, "torch.Tensor"),
    (dict(x=torch.ones(2, 6, 3, dtype=torch.int64), num_medoids=2), TypeError, "float"),
    (dict(x=torch.randn(6, 3), num_medoids=2), ValueError, "rows, tokens, dim"),
    (dict(x=X, num_medoids=0), ValueError, "num_medoids"),
    (dict(x=X, num_medoids=7), ValueError, "num_medoids"),
    (dict(x=X, num_medoids=2.0), ValueError, "num_medoids"),
    (dict(x=X, num_medoids=2, num_neighbors=0), ValueError, "num_neighbors"),
    (dict(x=X, num_medoids=2, num_neighbors=6), ValueError, "num_neighbors"),
    (dict(x=X, num_medoids=2, num_neighbors=True), ValueError, "num_neighbors"),
    (dict(x=X, num_medoids=2, sigma=0.0), ValueError, "sigma"),
    (dict(x=X, num_medoids=2, sigma=-1.0), ValueError, "sigma"),
    (dict(x=X, num_medoids=2, sigma=float("inf")), ValueError, "sigma"),
    (dict(x=X, num_medoids=2, sigma=float("nan")), ValueError, "sigma"),
    (dict(x=X, num_medoids=2, sigma="2"), TypeError, "sigma"),
    (dict(x=X, num_medoids=2, max_iters=-1), ValueError, "max_iters"),
    (dict(x=X, num_medoids=2, split_size=0), ValueError, "split_size"),
])
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_token_medoids(**kwargs)


def test_bad_inputs_of_the_embedding_and_graph():
    with pytest.raises(ValueError, match="num_components"):
        spectral_embedding(X, 7)
    with pytest.raises(ValueError, match="num_neighbors"):
        heat_kernel_affinity(X, num_neighbors=6)
    with pytest.raises(ValueError, match="sigma"):
        heat_kernel_affinity(X, sigma=0)
