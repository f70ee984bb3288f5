"""Reference (specification) of the Schur-complement kernel covariance op of "Dissecting CLIP".

Two parts, both plain PyTorch and float64-capable:

1. The op's kernels: the covariance blocks the backends compute (``schur_covariance_gram_reference`` and
   its backward), the contract of the CPU, Triton and CUDA kernels.
2. The published procedure (Ospanov, Jalali, Farnia; arXiv 2412.18645, code aziksh-ospanov/CLIP-DISSECTION)
   written plainly from its definitions, loops and cost included: the specification of
   ``convention="clip-dissection"`` in :mod:`clipfast.schur_covariance` and the benchmark's "published
   procedure" baseline.

Image embeddings ``X: (n, d)`` and text embeddings ``T: (n, d)`` are paired row by row; every function takes
them in that order, images first.

Covariances
-----------
A covariance kind turns each row into ``F`` features ``phi(z)`` and gives the joint (uncentred) covariance
the blocks ``C_tt``, ``C_tx = C_xt^T``, ``C_xx`` from the *feature Gram sums*

    S_tt = sum_i phi(t_i) phi(t_i)^T,   S_tx = sum_i phi(t_i) phi(x_i)^T,   S_xx = sum_i phi(x_i) phi(x_i)^T

(``(F, F)`` each, ordered as the joint covariance ``[[C_tt, C_tx], [C_xt, C_xx]]`` whose Schur complement of
``C_tt`` the op takes). The kinds (:data:`COVARIANCES`), the one vocabulary of every layer:

- ``"column_cosine"``: the published "cosine" kernel, cosine similarities between embedding *columns*
  over d: ``C_ab = D_a^{-1} S_ab D_b^{-1} / d`` with ``phi(z) = z`` (F = d) and ``D_a`` the column norms
  of ``A`` (``sqrt(diag(S_aa))``) clamped at 1e-8 (``torch.nn.functional.cosine_similarity``'s rule). The
  column norms need all n rows, so the Gram sums are of the raw rows and the normalisation comes after.
- ``"row_cosine"``: the cosine kernel of unit rows, ``phi(z) = z / max(||z||, 1e-12)`` (F = d), ``C = S / n``.
- ``"rff"``: random Fourier features of the Gaussian kernel ``exp(-||u - v||^2 / (2 sigma^2))``,
  ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)`` with ``W = omegas: (d, m)`` (F = 2m), ``C = S / n``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from clipfast.dtypes import compute_dtype

COVARIANCES = ("column_cosine", "row_cosine", "rff")
COLUMN_NORM_EPS = 1e-8
ROW_NORM_EPS = 1e-12


def check_covariance(covariance: str) -> None:
    """ValueError unless ``covariance`` is one of :data:`COVARIANCES`."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


def rff_features(z: torch.Tensor, omegas: torch.Tensor) -> torch.Tensor:
    """Random Fourier features ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)``: ``z: (k, d)``, ``W = omegas: (d, m)``
    -> ``(k, 2m)`` in the dtype of ``z @ omegas``; ``phi(u)^T phi(v)`` estimates the Gaussian kernel of the
    bandwidth ``W`` was drawn with (``W = randn(d, m) / sigma``)."""
    u = z @ omegas
    return torch.cat([torch.cos(u), torch.sin(u)], dim=1) / math.sqrt(omegas.shape[1])


# ----------------------------------------------------------------------------------------------------
# The op's kernels
# ----------------------------------------------------------------------------------------------------

def gram_features_reference(z: torch.Tensor, covariance: str, omegas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rows whose Gram sums make ``covariance``: ``z: (n, d)`` -> ``(n, F)`` in the computation dtype
    (raw rows for "column_cosine", unit rows for "row_cosine", random Fourier features for "rff")."""
    check_covariance(covariance)
    z = z.to(compute_dtype(z.dtype))
    if covariance == "column_cosine":
        return z
    if covariance == "row_cosine":
        return z / z.norm(dim=1, keepdim=True).clamp_min(ROW_NORM_EPS)
    return rff_features(z, omegas.to(z.dtype))


def schur_covariance_gram_reference(image: torch.Tensor, text: torch.Tensor, covariance: str,
                                    omegas: Optional[torch.Tensor] = None):
    """``(S_tt, S_tx, S_xx)``, each ``(F, F)``: sums over the n pairs of feature outer products."""
    phi_x = gram_features_reference(image, covariance, omegas)
    phi_t = gram_features_reference(text, covariance, omegas)
    return phi_t.T @ phi_t, phi_t.T @ phi_x, phi_x.T @ phi_x


def schur_covariance_gram_backward_reference(grad_tt, grad_tx, grad_xx, image: torch.Tensor, text: torch.Tensor,
                                             covariance: str, omegas: Optional[torch.Tensor] = None):
    """``(d_image, d_text)``: gradients of ``<G_tt, S_tt> + <G_tx, S_tx> + <G_xx, S_xx>`` w.r.t. both inputs:

        dPhi_x = Phi_x (G_xx + G_xx^T) + Phi_t G_tx,   dPhi_t = Phi_t (G_tt + G_tt^T) + Phi_x G_tx^T,

    then through phi row by row (the chain rule the kernels implement tile by tile)."""
    phi_x = gram_features_reference(image, covariance, omegas)
    phi_t = gram_features_reference(text, covariance, omegas)
    dtype = phi_t.dtype
    g_tt, g_tx, g_xx = grad_tt.to(dtype), grad_tx.to(dtype), grad_xx.to(dtype)
    d_phi_x = phi_x @ (g_xx + g_xx.T) + phi_t @ g_tx
    d_phi_t = phi_t @ (g_tt + g_tt.T) + phi_x @ g_tx.T
    return (_input_grad(image, phi_x, d_phi_x, covariance, omegas).to(image.dtype),
            _input_grad(text, phi_t, d_phi_t, covariance, omegas).to(text.dtype))


def _input_grad(z, phi, d_phi, covariance, omegas):
    z = z.to(phi.dtype)
    if covariance == "column_cosine":  # phi = z
        return d_phi
    if covariance == "row_cosine":  # phi = z / r: dz = (dphi - phi <phi, dphi>) / r above the clamp
        norm = z.norm(dim=1, keepdim=True)
        radial = (phi * d_phi).sum(1, keepdim=True) * (norm > ROW_NORM_EPS)
        return (d_phi - phi * radial) / norm.clamp_min(ROW_NORM_EPS)
    m = omegas.shape[1]  # rff: phi = [cos u, sin u] / sqrt(m), u = z W
    w = omegas.to(phi.dtype)
    u = z @ w
    du = (torch.cos(u) * d_phi[:, m:] - torch.sin(u) * d_phi[:, :m]) / math.sqrt(m)
    return du @ w.T


def covariance_from_gram(s_tt, s_tx, s_xx, covariance: str, n: int):
    """The covariance blocks ``(C_tt, C_tx, C_xx)`` of ``n`` pairs from their Gram sums (module docstring)."""
    check_covariance(covariance)
    if covariance == "column_cosine":
        d = s_tt.shape[0]
        inv_t = 1.0 / torch.sqrt(torch.diagonal(s_tt)).clamp_min(COLUMN_NORM_EPS)
        inv_x = 1.0 / torch.sqrt(torch.diagonal(s_xx)).clamp_min(COLUMN_NORM_EPS)
        return (inv_t[:, None] * s_tt * inv_t[None, :] / d, inv_t[:, None] * s_tx * inv_x[None, :] / d,
                inv_x[:, None] * s_xx * inv_x[None, :] / d)
    return s_tt / n, s_tx / n, s_xx / n


def kernel_covariance_reference(image: torch.Tensor, text: torch.Tensor, covariance: str,
                                omegas: Optional[torch.Tensor] = None):
    """``(C_tt, C_tx, C_xx)``, each ``(F, F)``, of the n pairs, for ``covariance`` in :data:`COVARIANCES`."""
    grams = schur_covariance_gram_reference(image, text, covariance, omegas)
    return covariance_from_gram(*grams, covariance, image.shape[0])


# ----------------------------------------------------------------------------------------------------
# The published procedure
# ----------------------------------------------------------------------------------------------------
# - Cosine kernel ("column_cosine"): ``C_ab[i, j] = cos(A[:, i], B[:, j]) / d``, one ``F.cosine_similarity``
#   between two embedding columns per entry, in a Python double loop (d^2 calls per block; slow beyond d ~ 100).
# - Gaussian kernel ("rff"): ``W: (d, m)`` drawn as ``randn(d, m) * (1 / sigma)`` and shared by text and
#   images; ``C_ab = sum_i phi(a_i) phi(b_i)^T / n`` accumulated from per-sample outer products,
#   ``batch_size`` samples per ``bmm`` (O(batch_size * 4m^2) memory per step).
# - ``P = C_tx^T pinv(C_tt + 1e-12 I) C_tx``, ``S = C_xx - P`` (pinv with PyTorch's default cut-off).
# - ``score(M) = exp(-sum_i l_i log(l_i / sum_j l_j))`` over the eigenvalues of M (``eigh``) clamped at
#   1e-10, unnormalised weights; SCE = score(S), text part = score(P).
# - Defocus: ``A* = pinv(C_tt + 1e-12 I) C_tx`` from reference pairs, ``x' = x - t A*`` on raw embeddings
#   (cosine) or on random features (Gaussian). The published Gaussian variant draws fresh frequencies for
#   the corrected features; here the frequencies that fitted A* are used (the meaningful reading).
# Everything runs in the inputs' dtype. ``kernel`` is the published option, "cosine" or "gaussian".

PUBLISHED_RIDGE = 1e-12  # the absolute jitter before pinv (below float32 resolution: a no-op in float32)
PUBLISHED_EIGENVALUE_FLOOR = 1e-10
PUBLISHED_BATCH_SIZE = 64  # the README's batchsize


def published_omegas(dim: int, rff_dim: int, sigma: float) -> torch.Tensor:
    """``randn(dim, rff_dim) * (1 / sigma)`` from torch's global RNG, float32 on the CPU, as published."""
    return torch.randn((dim, rff_dim)) * (1 / sigma)


def column_cosine_covariance_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(d, d)``: entry (i, j) = cosine similarity of column i of ``a`` and column j of ``b``, over d."""
    d = a.shape[1]
    out = torch.empty((d, d), dtype=a.dtype, device=a.device)
    for i in range(d):
        for j in range(d):
            out[i, j] = F.cosine_similarity(a[:, i], b[:, j], dim=0)
    return out / math.sqrt(d * d)


def rff_covariance_loop(a: torch.Tensor, b: torch.Tensor, omegas: torch.Tensor,
                        batch_size: int = PUBLISHED_BATCH_SIZE) -> torch.Tensor:
    """``(2m, 2m)``: ``sum_i phi(a_i) phi(b_i)^T / n`` from per-sample outer products, batch by batch."""
    n = a.shape[0]
    features = 2 * omegas.shape[1]
    total = torch.zeros((features, features), dtype=a.dtype, device=a.device)
    for start in range(0, n, batch_size):
        phi_a = rff_features(a[start:start + batch_size], omegas)
        phi_b = rff_features(b[start:start + batch_size], omegas)
        total += torch.bmm(phi_a.unsqueeze(2), phi_b.unsqueeze(1)).sum(0)
    return total / n


def published_covariances(image: torch.Tensor, text: torch.Tensor, kernel: str = "cosine",
                          omegas: Optional[torch.Tensor] = None, batch_size: int = PUBLISHED_BATCH_SIZE):
    """``(C_tt, C_tx, C_xx)`` of the published kernels (``omegas: (d, m)`` for ``kernel="gaussian"``)."""
    if kernel == "cosine":
        return (column_cosine_covariance_loop(text, text), column_cosine_covariance_loop(text, image),
                column_cosine_covariance_loop(image, image))
    if kernel == "gaussian":
        omegas = omegas.to(text.dtype)
        return (rff_covariance_loop(text, text, omegas, batch_size),
                rff_covariance_loop(text, image, omegas, batch_size),
                rff_covariance_loop(image, image, omegas, batch_size))
    raise ValueError(f"kernel must be 'cosine' or 'gaussian', got {kernel!r}")


def published_text_inverse(c_tt: torch.Tensor) -> torch.Tensor:
    """``pinv(C_tt + 1e-12 I)``."""
    return torch.linalg.pinv(c_tt + PUBLISHED_RIDGE * torch.eye(c_tt.shape[0], dtype=c_tt.dtype, device=c_tt.device))


def published_schur_complement(image: torch.Tensor, text: torch.Tensor, kernel: str = "cosine",
                               omegas: Optional[torch.Tensor] = None, batch_size: int = PUBLISHED_BATCH_SIZE):
    """``(C_tt, C_tx, C_xx, P, S)`` with ``P = C_tx^T pinv(C_tt + 1e-12 I) C_tx`` and ``S = C_xx - P``."""
    c_tt, c_tx, c_xx = published_covariances(image, text, kernel, omegas, batch_size)
    text_part = c_tx.T @ published_text_inverse(c_tt) @ c_tx
    return c_tt, c_tx, c_xx, text_part, c_xx - text_part


def published_score(matrix: torch.Tensor) -> torch.Tensor:
    """``exp(-sum_i l_i log(l_i / sum_j l_j))``, ``l`` = eigenvalues of ``matrix`` clamped at 1e-10."""
    eigenvalues = torch.linalg.eigh(matrix)[0]
    lam = torch.clamp(eigenvalues, min=PUBLISHED_EIGENVALUE_FLOOR)
    total = lam.sum()
    return torch.exp(-torch.sum(lam * torch.log(lam / total)))


def published_sce_score(image: torch.Tensor, text: torch.Tensor, kernel: str = "cosine",
                        omegas: Optional[torch.Tensor] = None, batch_size: int = PUBLISHED_BATCH_SIZE):
    """``(score(S), score(P))``: the SCE of the images and the score of the text part."""
    *_, text_part, complement = published_schur_complement(image, text, kernel, omegas, batch_size)
    return published_score(complement), published_score(text_part)


def published_defocus(image: torch.Tensor, text: torch.Tensor, reference_images: torch.Tensor,
                      reference_texts: torch.Tensor, kernel: str = "cosine", omegas: Optional[torch.Tensor] = None,
                      batch_size: int = PUBLISHED_BATCH_SIZE):
    """``(x - t A*, A*)`` with ``A* = pinv(C_tt + 1e-12 I) C_tx`` of the reference pairs; Gaussian: in the
    random-feature space of the same ``omegas``."""
    c_tt, c_tx, _ = published_covariances(reference_images, reference_texts, kernel, omegas, batch_size)
    a_star = published_text_inverse(c_tt) @ c_tx
    if kernel == "gaussian":
        w = omegas.to(image.dtype)
        image, text = rff_features(image, w), rff_features(text, w)
    return image - text @ a_star, a_star
