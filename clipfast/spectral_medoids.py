"""Spectral token medoids (CenterCLIP's spectral variant): k-medoids on a normalised-Laplacian embedding.

Per row of ``x: (R, N, D)``:

1. Heat-kernel affinity ``W_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` (:func:`heat_kernel_affinity`),
   dense or sparsified to a symmetric k-nearest-neighbour graph.
2. Normalised Laplacian ``L = I - D^{-1/2} W D^{-1/2}`` with ``D = diag(sum_j W_ij)``; the eigenvectors of
   its K smallest eigenvalues, each row scaled to unit norm, are the embedding (:func:`spectral_embedding`).
3. The deterministic k-medoids of :func:`clipfast.token_medoids` on that embedding picks K tokens, which
   are gathered from ``x`` (:func:`spectral_token_medoids`).

Scale trap. The kernel width is absolute: nothing adapts ``sigma`` to the features. With the default
``sigma = 2`` and 768-d tokens of unit-variance coordinates, ``||x_i - x_j||^2 ~ 1536`` and
``exp(-1536 / 8) = exp(-192)`` is below the smallest float32 subnormal (``exp(-103.97)``; the affinities
are computed in float32 for every input dtype but float64): every off-diagonal affinity is exactly 0,
``W = I``, ``D = I`` and ``L = 0``. Every vector is then an eigenvector of eigenvalue 0, so the embedding
is whatever basis the eigensolver returns for the zero matrix and says nothing about the tokens; the
k-medoids on it still returns a valid, but meaningless, clustering. float64 inputs underflow later
(``||x_i - x_j||^2 > ~1490 sigma^2``), but once every off-diagonal affinity is negligible against
``W_ii = 1`` the degrees round to 1 and the embedding is as uninformative. This behaviour is reproduced
on purpose, not repaired: rescale the features (or choose ``sigma``) so that typical squared distances
are a few ``2 sigma^2``, e.g. unit-norm tokens with ``sigma = 2``, or ``sigma`` of the order of the
median pairwise distance.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from clipfast import functional
from clipfast.dtypes import compute_dtype

# Added to every embedding row's norm before dividing, so that an all-zero row stays zero (CenterCLIP's value).
ROW_NORM_EPS = 1e-6


def _check_inputs(x, count: int, count_name: str, num_neighbors: Optional[int], sigma: float) -> None:
    functional.check_float_tensor(x, "x", ("rows", "tokens", "dim"))
    n = x.shape[1]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n:
        raise ValueError(f"{count_name} must be an int in [1, {n}] (the tokens per row), got {count!r}")
    if num_neighbors is not None and (isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int)
                                      or not 1 <= num_neighbors <= n - 1):
        raise ValueError(f"num_neighbors must be None (dense affinity) or an int in [1, {n - 1}] "
                         f"(the other tokens of a row), got {num_neighbors!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number, got {type(sigma).__name__}")
    if not (math.isfinite(float(sigma)) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")


def _affinity(x: torch.Tensor, num_neighbors: Optional[int], sigma: float) -> torch.Tensor:
    x = x.detach().to(compute_dtype(x.dtype))
    # Distances are translation invariant; centring on the row mean keeps ||a||^2 + ||b||^2 - 2 a.b
    # from cancelling catastrophically when the tokens share a large offset.
    centred = x - x.mean(dim=1, keepdim=True)
    sq = (centred * centred).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * centred @ centred.transpose(1, 2)).clamp_min(0)
    # Exactly symmetric with an exact zero diagonal (GEMM rounding gives neither), so W is symmetric
    # and W_ii = 1.
    d2 = (d2 + d2.transpose(1, 2)) / 2
    d2.diagonal(dim1=1, dim2=2).zero_()
    w = torch.exp(d2 / (-2.0 * float(sigma) ** 2))
    if num_neighbors is None:
        return w
    # The k-th largest affinity to the other tokens; the diagonal is excluded by pushing it below every
    # affinity (all are >= 0).
    others = w.clone()
    others.diagonal(dim1=1, dim2=2).fill_(-1.0)
    kth = others.topk(num_neighbors, dim=-1).values[..., -1:]
    # A threshold rather than topk's indices: every token tied with the k-th value is kept, so the graph
    # does not depend on the tokens' order (a row may then keep more than k neighbours).
    keep = w >= kth
    keep = keep | keep.transpose(1, 2)
    return w * keep


def heat_kernel_affinity(x: torch.Tensor, *, num_neighbors: Optional[int] = None,
                         sigma: float = 2.0) -> torch.Tensor:
    """The graph of :func:`spectral_embedding`: heat-kernel affinities, optionally k-nearest-neighbour.

    ``W_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` per row of ``x``, the squared distances computed on
    row-mean-centred tokens, clamped at 0, exactly symmetric, with an exact zero diagonal (``W_ii = 1``).

    With ``num_neighbors = k``: ``W_ij`` is kept where ``W_ij >= t_i`` or ``W_ji >= t_j``, and set to 0
    elsewhere, ``t_i`` being the k-th largest of ``{W_ij : j != i}``: j is among i's k nearest tokens OR
    i among j's (symmetrised by OR). Ties at the k-th value are all kept. The token itself is not
    counted among its k neighbours and ``W_ii = 1`` is always kept; a threshold taken over the full row,
    diagonal included (CenterCLIP's KNN mode), corresponds to ``num_neighbors = k - 1``.

    Args:
        x: (R, N, D) float; not differentiated through.
        num_neighbors: None (dense) or k in [1, N - 1].
        sigma: kernel width, finite and > 0 (see the scale trap in the module docstring).

    Returns:
        (R, N, N) in the computation dtype (float64 for float64 ``x``, float32 otherwise), symmetric,
        entries in [0, 1], unit diagonal.
    """
    _check_inputs(x, 1, "the token count", num_neighbors, sigma)
    with torch.no_grad():
        return _affinity(x, num_neighbors, sigma)


def spectral_embedding(x: torch.Tensor, num_components: int, *, num_neighbors: Optional[int] = None,
                       sigma: float = 2.0) -> torch.Tensor:
    """Row-normalised eigenvectors of the smallest eigenvalues of the normalised graph Laplacian.

    With ``W`` from :func:`heat_kernel_affinity` and degrees ``d_i = sum_j W_ij`` (>= 1, since
    ``W_ii = 1``)::

        L = I - D^{-1/2} W D^{-1/2},   L_ij = delta_ij - W_ij / sqrt(d_i d_j)
        L = V diag(lambda) V^T,        lambda ascending
        Q = V[:, :num_components]      (N, num_components)
        embedding_i = Q_i / (||Q_i|| + 1e-6)

    The scaling by ``D^{-1/2}`` is a broadcast product, O(N^2). ``L`` is symmetrised exactly and
    decomposed by ``torch.linalg.eigh`` in float64 whatever the input dtype: the eigenvalues at the
    bottom of the spectrum crowd near 0 (one per well-separated group), and an eigensolver mixes
    eigenvectors whose eigenvalues are closer than its rounding (~1e-7 of ``||L|| ~ 1`` in float32,
    ~1e-16 in float64), which would blur the cut between the K-th and the next eigenvector. ``L`` is
    symmetric positive semi-definite, so these are also the singular vectors of the smallest singular
    values. Eigenvectors are unique only up to sign (and up to rotation inside a repeated eigenvalue's
    eigenspace); no sign convention is imposed, because Euclidean distances and norms of the rows, all
    the k-medoids uses, do not depend on column signs.
    After normalisation every non-zero row has norm ~1.

    Args:
        x: (R, N, D) float; not differentiated through (computed without autograd).
        num_components: in [1, N].
        num_neighbors, sigma: as :func:`heat_kernel_affinity`; mind the scale trap of the module docstring
            (``sigma = 2`` with raw 768-d features gives ``L = 0`` and an arbitrary embedding).

    Returns:
        (R, N, num_components) in the computation dtype (float64 for float64 ``x``, float32 otherwise),
        so that the k-medoids that follows runs the kernels of that dtype.

    Raises:
        TypeError: non-tensor or non-float x, non-real sigma. ValueError: x not 3-D, num_components
        outside [1, N], num_neighbors outside [1, N - 1], sigma not finite or <= 0.
    """
    _check_inputs(x, num_components, "num_components", num_neighbors, sigma)
    with torch.no_grad():
        w = _affinity(x, num_neighbors, sigma).to(torch.float64)
        scale = w.sum(-1).rsqrt()
        laplacian = -(scale[:, :, None] * w * scale[:, None, :])
        laplacian.diagonal(dim1=1, dim2=2).add_(1.0)
        # (s_i W_ij) s_j and (s_j W_ji) s_i may round differently; eigh reads one triangle only.
        laplacian = (laplacian + laplacian.transpose(1, 2)) / 2
        _, vectors = torch.linalg.eigh(laplacian)
        q = vectors[..., :num_components]
        q = q / (q.norm(dim=-1, keepdim=True) + ROW_NORM_EPS)
        return q.to(compute_dtype(x.dtype))


def spectral_token_medoids(x: torch.Tensor, num_medoids: int, *, num_neighbors: Optional[int] = None,
                           sigma: float = 2.0, max_iters: int = 100, split_size: Optional[int] = None):
    """K tokens per row chosen by k-medoids on the spectral embedding (CenterCLIP's spectral clustering).

    ``E = spectral_embedding(x, K, num_neighbors=num_neighbors, sigma=sigma)`` (R, N, K), then the
    k-medoids of :func:`clipfast.token_medoids` on ``E`` (Euclidean distances between embedding rows,
    KKZ initialisation, lowest-index ties, ``max_iters`` and ``split_size`` as there). The chosen tokens
    are gathered from ``x``. KKZ starts from the largest-norm row of ``E``; as the rows are normalised,
    that first pick is a near-tie decided by rounding, which is one reason why exact indices are not
    reproducible across eigensolvers or devices, while the partition into well-separated groups is.

    Args:
        x: (R, N, D) float.
        num_medoids: K in [1, N]; also the number of eigenvectors.
        num_neighbors, sigma: as :func:`heat_kernel_affinity`. ``sigma`` must suit the feature scale
            (module docstring: with ``sigma = 2`` on raw 768-d features the result is arbitrary).
        max_iters, split_size: as :func:`clipfast.token_medoids`.

    Returns:
        ``(medoids (R, K, D), medoid_index (R, K) int64 ascending, assignment (R, N) int64)``; the
        assignment indexes the sorted medoids. ``medoids`` is gathered from ``x``: gradients flow to the
        chosen tokens only; the embedding and the indices are not differentiable.

    Raises:
        As :func:`spectral_embedding` (with ``num_medoids`` for ``num_components``) and
        :func:`clipfast.token_medoids` (max_iters, split_size).
    """
    _check_inputs(x, num_medoids, "num_medoids", num_neighbors, sigma)
    functional.check_medoid_iterations(max_iters, split_size)  # before the eigendecomposition, not after
    embedding = spectral_embedding(x, num_medoids, num_neighbors=num_neighbors, sigma=sigma)
    _, index, assignment = functional.token_medoids(embedding, num_medoids, max_iters=max_iters,
                                                    split_size=split_size)
    medoids = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return medoids, index, assignment
