"""Reference (specification) of deterministic batched k-medoids over token segments (CenterCLIP,
arXiv:2205.00823), in plain PyTorch and readable loops.

Input ``x: (R, N, D)``: R independent rows (a segment's tokens each). Per row, with the distance matrix
``D[i, j]`` (Euclidean ``||x_i - x_j||``, or cosine ``1 - cos(x_i, x_j)`` with norms clamped at 1e-8):

1. KKZ initialisation: ``m_0 = argmax_n ||x_n||`` (raw norms); then ``m_i = argmax_n min_{j<i} D[m_j, n]``
   over the tokens not chosen yet (the token farthest from its nearest chosen medoid; a chosen token is
   never picked again, so the K medoids are K distinct tokens even when fewer than K tokens differ).
2. Up to ``max_iters`` times: assign every token to its nearest medoid (``argmin_k D[m_k, n]`` in the
   current medoid order; a medoid token always belongs to its own cluster, as in CenterCLIP, whose
   diagonal shift makes a token strictly nearest to itself: this only decides exact zero-distance ties
   such as duplicate tokens); replace each medoid by the member of its cluster with the least total
   distance to the cluster's members. Clusters are disjoint and each holds its medoid, so the medoids
   stay distinct. A row stops when no medoid changes. With ``split_size = s > 0``
   (CenterCLIP's chunked stopping) rows are taken in consecutive chunks of s and a chunk iterates all
   its rows until none of them changes.
3. Medoids sorted ascending; the final assignment is against the sorted medoids.

Every argmin / argmax breaks ties to the lowest index; distance matrices are exactly symmetric. Euclidean distances are computed on tokens
centred on their row mean (translation invariance), so ``||a||^2 + ||b||^2 - 2 a.b`` does not cancel
catastrophically for large-norm tokens.
"""

from __future__ import annotations

import torch

from clipfast.dtypes import compute_dtype

METRICS = ("euclidean", "cosine")
COSINE_NORM_EPS = 1e-8


def distance_matrices(x: torch.Tensor, metric: str) -> torch.Tensor:
    """``(R, N, N)`` distances in the computation dtype, exact zeros on the diagonal."""
    x = x.to(compute_dtype(x.dtype))
    if metric == "euclidean":
        centred = x - x.mean(dim=1, keepdim=True)
        sq = (centred * centred).sum(-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2 * centred @ centred.transpose(1, 2)).clamp_min(0)
        dist = d2.sqrt()
    elif metric == "cosine":
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_NORM_EPS)
        dist = 1 - unit @ unit.transpose(1, 2)
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    # Exactly symmetric (GEMM rounding is not): a two-token cluster's equal costs must tie, so that the
    # lower index wins rather than a rounding difference.
    dist = (dist + dist.transpose(1, 2)) / 2
    return dist * (1 - torch.eye(x.shape[1], dtype=dist.dtype, device=dist.device))


def _first_argmax(values: list) -> int:
    best = max(values)
    return values.index(best)


def _first_argmin(values: list) -> int:
    best = min(values)
    return values.index(best)


def _kkz(dist: list, norms: list, k: int) -> list:
    medoids = [_first_argmax(norms)]
    nearest = list(dist[medoids[0]])
    for _ in range(1, k):
        for m in medoids:  # chosen tokens are out of the running (distances are >= 0 > -inf)
            nearest[m] = -float("inf")
        medoids.append(_first_argmax(nearest))
        nearest = [min(a, b) for a, b in zip(nearest, dist[medoids[-1]])]
    return medoids


def _assign(dist: list, medoids: list) -> list:
    n = len(dist)
    own = {m: k for k, m in enumerate(medoids)}
    return [own[j] if j in own else _first_argmin([dist[m][j] for m in medoids]) for j in range(n)]


def _update(dist: list, medoids: list) -> list:
    assignment = _assign(dist, medoids)
    updated = []
    for cluster, medoid in enumerate(medoids):
        members = [i for i, a in enumerate(assignment) if a == cluster]
        if not members:
            updated.append(medoid)
            continue
        costs = [sum(dist[i][j] for j in members) for i in members]
        updated.append(members[_first_argmin(costs)])
    return updated


def token_medoids_index_reference(x: torch.Tensor, num_medoids: int, metric: str = "euclidean",
                                  max_iters: int = 100, split_size: int = 0):
    """``(medoid_index (R, K) int64 ascending, assignment (R, N) int64 into the sorted medoids)``."""
    rows, n, _ = x.shape
    dist = distance_matrices(x, metric).tolist()
    norms = x.to(compute_dtype(x.dtype)).norm(dim=-1).tolist()
    medoids = [_kkz(dist[r], norms[r], num_medoids) for r in range(rows)]
    chunk = split_size if split_size > 0 else 1  # per-row stopping is chunks of one row
    for start in range(0, rows, chunk):
        members = range(start, min(start + chunk, rows))
        for _ in range(max_iters):
            changed = False
            for r in members:
                updated = _update(dist[r], medoids[r])
                changed |= updated != medoids[r]
                medoids[r] = updated
            if not changed:
                break
    index = [sorted(m) for m in medoids]
    assignment = [_assign(dist[r], index[r]) for r in range(rows)]
    return (torch.tensor(index, dtype=torch.int64, device=x.device).reshape(rows, num_medoids),
            torch.tensor(assignment, dtype=torch.int64, device=x.device).reshape(rows, n))
