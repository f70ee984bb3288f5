"""Reference (specification) of the kernel covariance blocks behind the Schur-complement op.

Text embeddings ``T: (n, d)`` and image embeddings ``X: (n, d)`` are paired row by row. A feature map
``phi`` turns each row into ``F`` features and the joint (uncentred) covariance has the blocks

    S_tt = sum_i phi(t_i) phi(t_i)^T,  S_tx = sum_i phi(t_i) phi(x_i)^T,  S_xx = sum_i phi(x_i) phi(x_i)^T

(the *feature Gram* sums, ``(F, F)`` each). Feature maps:

- ``"linear"``: ``phi(z) = z`` (F = d);
- ``"row_normalized"``: ``phi(z) = z / max(||z||, 1e-12)`` (F = d), the cosine kernel;
- ``"rff"``: ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)`` with ``W = omegas: (d, m)`` (F = 2m), random
  Fourier features of the Gaussian kernel (``W = randn(d, m) / sigma``).

:func:`kernel_covariance_reference` turns the sums into the covariances of "Dissecting CLIP"
(arXiv 2412.18645): ``C = S / n`` for ``"row_cosine"`` and ``"rff"``; for ``"column_cosine"`` (the
published "cosine" kernel: cosine similarities between embedding *columns*, divided by d)
``C_ab = D_a^{-1} S_ab D_b^{-1} / d`` with ``S`` from the linear map and ``D_a`` the column norms of
``A`` clamped at 1e-8 (``torch.nn.functional.cosine_similarity``'s rule).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from clipfast.dtypes import compute_dtype

FEATURE_MAPS = ("linear", "row_normalized", "rff")
COVARIANCES = ("column_cosine", "row_cosine", "rff")
COLUMN_NORM_EPS = 1e-8
ROW_NORM_EPS = 1e-12


def feature_map_reference(z: torch.Tensor, feature_map: str, omegas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phi applied to every row of ``z: (n, d)`` -> ``(n, F)`` in the computation dtype."""
    z = z.to(compute_dtype(z.dtype))
    if feature_map == "linear":
        return z
    if feature_map == "row_normalized":
        return z / z.norm(dim=1, keepdim=True).clamp_min(ROW_NORM_EPS)
    if feature_map == "rff":
        u = z @ omegas.to(z.dtype)
        return torch.cat([torch.cos(u), torch.sin(u)], dim=1) / math.sqrt(omegas.shape[1])
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def feature_gram_reference(text: torch.Tensor, image: torch.Tensor, feature_map: str,
                           omegas: Optional[torch.Tensor] = None):
    """``(S_tt, S_tx, S_xx)``, each ``(F, F)``: sums over the n pairs of feature outer products."""
    phi_t = feature_map_reference(text, feature_map, omegas)
    phi_x = feature_map_reference(image, feature_map, omegas)
    return phi_t.T @ phi_t, phi_t.T @ phi_x, phi_x.T @ phi_x


def feature_gram_backward_reference(grad_tt, grad_tx, grad_xx, text: torch.Tensor, image: torch.Tensor,
                                    feature_map: str, omegas: Optional[torch.Tensor] = None):
    """Gradients of ``<G_tt, S_tt> + <G_tx, S_tx> + <G_xx, S_xx>`` w.r.t. ``text`` and ``image``:

        dPhi_t = Phi_t (G_tt + G_tt^T) + Phi_x G_tx^T,   dPhi_x = Phi_x (G_xx + G_xx^T) + Phi_t G_tx,

    then through phi row by row (the chain rule the kernels implement tile by tile)."""
    phi_t = feature_map_reference(text, feature_map, omegas)
    phi_x = feature_map_reference(image, feature_map, omegas)
    dtype = phi_t.dtype
    g_tt, g_tx, g_xx = grad_tt.to(dtype), grad_tx.to(dtype), grad_xx.to(dtype)
    d_phi_t = phi_t @ (g_tt + g_tt.T) + phi_x @ g_tx.T
    d_phi_x = phi_x @ (g_xx + g_xx.T) + phi_t @ g_tx
    return (_input_grad(text, phi_t, d_phi_t, feature_map, omegas).to(text.dtype),
            _input_grad(image, phi_x, d_phi_x, feature_map, omegas).to(image.dtype))


def _input_grad(z, phi, d_phi, feature_map, omegas):
    z = z.to(phi.dtype)
    if feature_map == "linear":
        return d_phi
    if feature_map == "row_normalized":  # phi = z / r: dz = (dphi - phi <phi, dphi>) / r above the clamp
        norm = z.norm(dim=1, keepdim=True)
        radial = (phi * d_phi).sum(1, keepdim=True) * (norm > ROW_NORM_EPS)
        return (d_phi - phi * radial) / norm.clamp_min(ROW_NORM_EPS)
    m = omegas.shape[1]  # rff: phi = [cos u, sin u] / sqrt(m), u = z W
    w = omegas.to(phi.dtype)
    u = z @ w
    du = (torch.cos(u) * d_phi[:, m:] - torch.sin(u) * d_phi[:, :m]) / math.sqrt(m)
    return du @ w.T


def covariance_from_gram(s_tt, s_tx, s_xx, covariance: str, n: int):
    """The covariance blocks ``(C_tt, C_tx, C_xx)`` from the feature Gram sums (see module docstring)."""
    if covariance == "column_cosine":
        d = s_tt.shape[0]
        inv_t = 1.0 / torch.sqrt(torch.diagonal(s_tt)).clamp_min(COLUMN_NORM_EPS)
        inv_x = 1.0 / torch.sqrt(torch.diagonal(s_xx)).clamp_min(COLUMN_NORM_EPS)
        return (inv_t[:, None] * s_tt * inv_t[None, :] / d, inv_t[:, None] * s_tx * inv_x[None, :] / d,
                inv_x[:, None] * s_xx * inv_x[None, :] / d)
    if covariance in ("row_cosine", "rff"):
        return s_tt / n, s_tx / n, s_xx / n
    raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


FEATURE_MAP_OF = {"column_cosine": "linear", "row_cosine": "row_normalized", "rff": "rff"}


def kernel_covariance_reference(text: torch.Tensor, image: torch.Tensor, feature_map: str,
                                omegas: Optional[torch.Tensor] = None):
    """``(C_tt, C_tx, C_xx)`` for ``feature_map`` in ``("column_cosine", "row_cosine", "rff")``."""
    if feature_map not in COVARIANCES:
        raise ValueError(f"feature_map must be one of {COVARIANCES}, got {feature_map!r}")
    grams = feature_gram_reference(text, image, FEATURE_MAP_OF[feature_map], omegas)
    return covariance_from_gram(*grams, feature_map, text.shape[0])
