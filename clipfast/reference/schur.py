"""The published "Dissecting CLIP" procedure, written plainly from its definitions (the test oracle).

This is the specification of ``convention="clip-dissection"`` in :mod:`clipfast.schur`, and the
benchmark's "faithful port of the published procedure" baseline: it keeps the published loops and
their cost. Text ``T: (n, d)``, images ``X: (n, d)``, paired by row.

- Cosine kernel: ``C_ab[i, j] = cos(A[:, i], B[:, j]) / d``, one ``F.cosine_similarity`` between two
  embedding *columns* per entry, in a Python double loop (d^2 calls per block; slow beyond d ~ 100).
- Gaussian kernel: random Fourier features ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)``, ``W: (d, m)``
  drawn as ``randn(d, m) * (1 / sigma)`` and shared by text and images; ``C_ab = sum_i phi(a_i) phi(b_i)^T / n``
  accumulated from per-sample outer products, ``batch_size`` samples per ``bmm`` (O(batch_size * 4m^2)
  memory per step).
- ``P = C_tx^T pinv(C_tt + 1e-12 I) C_tx``, ``S = C_xx - P`` (pinv with PyTorch's default cut-off).
- ``score(M) = exp(-sum_i l_i log(l_i / sum_j l_j))`` over the eigenvalues of M (``eigh``) clamped at
  1e-10, unnormalised weights; SCE = score(S), text part = score(P).
- Defocus: ``A* = pinv(C_tt + 1e-12 I) C_tx`` from reference pairs, ``x' = x - t A*`` on raw embeddings
  (cosine) or on random features (Gaussian). The published Gaussian variant draws fresh frequencies for
  the corrected features; here the frequencies that fitted A* are used (the meaningful reading).

Everything runs in the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

PUBLISHED_RIDGE = 1e-12
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


def rff_features(z: torch.Tensor, omegas: torch.Tensor) -> torch.Tensor:
    """``[cos(z W), sin(z W)] / sqrt(m)`` for ``z: (k, d)``, ``W: (d, m)`` -> ``(k, 2m)``."""
    u = z @ omegas
    return torch.cat([torch.cos(u), torch.sin(u)], dim=1) / math.sqrt(omegas.shape[1])


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


def published_covariances(text: torch.Tensor, image: torch.Tensor, kernel: str = "cosine",
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
    c_tt, c_tx, c_xx = published_covariances(text, image, kernel, omegas, batch_size)
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
    c_tt, c_tx, _ = published_covariances(reference_texts, reference_images, kernel, omegas, batch_size)
    a_star = published_text_inverse(c_tt) @ c_tx
    if kernel == "gaussian":
        w = omegas.to(image.dtype)
        image, text = rff_features(image, w), rff_features(text, w)
    return image - text @ a_star, a_star
