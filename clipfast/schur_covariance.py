"""Schur-complement kernel covariance, the SCE diversity score and text-defocused embeddings.

"Dissecting CLIP" (Ospanov, Jalali, Farnia; arXiv 2412.18645, code aziksh-ospanov/CLIP-DISSECTION) splits
the kernel covariance of a text-to-image model's image embeddings into the part the paired prompts
explain and the rest. With text embeddings ``T: (n, d)``, image embeddings ``X: (n, d)`` paired by row
and a feature map ``phi`` (``F`` features), the joint uncentred covariance has the ``(F, F)`` blocks
``C_tt``, ``C_tx = C_xt^T``, ``C_xx`` and

    P = C_tx^T C_tt^{-1} C_tx        (text part: what a linear map of phi(t) explains of phi(x))
    S = C_xx - P                     (Schur complement of C_tt in the joint covariance)

``S`` is the covariance of the residual of the uncentred least-squares regression of ``phi(x)`` on
``phi(t)``; the entropy of its spectrum (Schur Complement Entropy, SCE) measures the diversity a model
adds beyond its prompts. ``A* = C_tt^{-1} C_tx`` is that regression, and ``phi(x) - phi(t) A*`` removes
a prompt's direction from an embedding ("defocus").

Two conventions:

- ``"clip-dissection"`` reproduces the published code: the "cosine" kernel is the column-cosine
  covariance (cosines between embedding *columns*, divided by d), the inverse is
  ``torch.linalg.pinv(C_tt + 1e-12 I)`` with PyTorch's default cut-off, computed in the input dtype (so
  float32 inputs give the published float32 numbers), and the score of a PSD matrix with eigenvalues
  ``l_i`` clamped at 1e-10 is ``exp(-sum_i l_i log(l_i / sum_j l_j))`` (unnormalised weights: the log
  score is the trace times the entropy, not the entropy).
- ``"normalized"`` (default): the cosine kernel of unit rows, ``phi(z) = z / ||z||``, ``C = phi^T phi / n``
  (trace 1); the inverse is a Cholesky solve with an explicit ridge; the score is the exponentiated Renyi
  entropy of the trace-normalised spectrum (the Vendi family, orders 1, 1.5, 2, 2.5, inf).

The Gaussian kernel uses random Fourier features ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)`` with
``W = randn(d, m) / sigma`` shared by text and images (``F = 2m``) in both conventions. The covariance
blocks come from the registered op :func:`clipfast.ops.schur_covariance.kernel_covariance` (one tiled
pass over the n pairs, differentiable w.r.t. both embedding matrices), which names the three covariances
the user's ``kernel`` and ``convention`` select "column_cosine", "row_cosine" and "rff"
(:func:`covariance_kind`); everything after it is O(F^3) dense linear algebra on ``(F, F)`` matrices and
never depends on n. Every function takes the image embeddings first, then their prompts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from clipfast.dtypes import compute_dtype
from clipfast.functional import check_feature_pair, check_float_tensor
from clipfast.inputs import check_no_nan
from clipfast.ops.schur_covariance import kernel_covariance
from clipfast.reference.schur_covariance import PUBLISHED_EIGENVALUE_FLOOR, PUBLISHED_RIDGE, rff_features

KERNELS = ("cosine", "gaussian")
CONVENTIONS = ("normalized", "clip-dissection")
ORDERS = (1.0, 1.5, 2.0, 2.5, math.inf)

# Relative ridge of the "normalized" convention: the Cholesky factor is taken of
# C_tt + DEFAULT_RIDGE * tr(C_tt) / F * I. Measured with sce_score, float32 vs float64 runs on the same
# data and frequencies (n = 2000, d = 64; correlated random pairs and CLIP-like synthetic pairs):
# - C_tt well posed (cosine F = 64; Gaussian RFF F = 512): SCE and text-part score agree to <= 1e-6
#   relative for every ridge from 1e-7 to 1e-2;
# - C_tt singular (RFF F = 2500 > n): SCE gap 2e-2 at ridge 1e-5, 1e-4..5e-4 at 1e-4, 1.5e-4..3e-4 at
#   1e-3, 5e-5 at 1e-2 (text part <= 1e-5 from 1e-3 on); below 1e-5 the float32 Cholesky fails.
# For contrast, the published pinv path on the same data differs by 1-9% (F = 512) and 1.00 vs 3.0-3.3
# (F = 2500) between float32 and float64. 1e-3 moves well-posed scores by <= 0.3% (cosine 0.007%) from
# their ridge-free values.
DEFAULT_RIDGE = 1e-3
# Why the "normalized" convention computes in float64 when F >= n, whatever the input dtype: C_tt (F x F)
# then has rank <= n < F, and S is decided by the ridge in C_tt's null space, where its eigenvalues are
# ridge * tr(C_tt) / F = 1e-3 / F (RFF: tr = 1): at F = 5000 that is 2e-7, within a factor ~20 of float32's
# resolution of C_tt (eps * lambda_max ~ 1e-8) and S = C_xx - P cancels to that level. Measured on 500
# paired 64-d embeddings with 2500 frequencies: float32 and float64 SCE 1-10% apart at ridge 1e-3 (still
# 0.4-1.3% at 1e-2); float32 covariances with float64 algebra 8e-4 at F = 1000 and worse above; float64
# from the float32-rounded inputs 1e-10. So the whole computation (features, covariance, split, spectrum)
# runs in float64 there; scores and matrices come back in the input's computation dtype. F < n is well
# posed and stays in the input dtype (<= 1e-6 apart, see DEFAULT_RIDGE). compute_dtype= overrides it.
def work_dtype(input_dtype: torch.dtype, convention: str, features: int, n: int,
               override: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype a Schur split of ``n`` pairs with ``features`` features is computed in (see above)."""
    if override is not None:
        if override not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, got {override!r}")
        return override
    if convention == "normalized" and features >= n:
        return torch.float64
    return compute_dtype(input_dtype)


@dataclass(frozen=True, eq=False)
class SchurComplement:
    """The blocks of the joint kernel covariance and its Schur-complement split, each ``(F, F)``.

    Attributes:
        text_cov: ``C_tt``. cross_cov: ``C_tx`` (rows: text features, columns: image features).
        image_cov: ``C_xx``. text_part: ``P = C_tx^T C_tt^{-1} C_tx`` (the convention's inverse).
        complement: ``S = C_xx - P``; ``text_part + complement == image_cov`` up to rounding.
        omegas: the ``(d, m)`` random-feature frequencies used (``None`` for the cosine kernel).
        kernel, convention: as requested. ridge: the ridge used (relative for "normalized",
            absolute for "clip-dissection").
    """

    text_cov: torch.Tensor
    cross_cov: torch.Tensor
    image_cov: torch.Tensor
    text_part: torch.Tensor
    complement: torch.Tensor
    omegas: Optional[torch.Tensor]
    kernel: str
    convention: str
    ridge: float


@dataclass(frozen=True, eq=False)
class ExactGaussianSchur:
    """Non-zero spectra (ascending, length n) of the exact-kernel Gaussian split and their scores.

    ``sce`` and ``text_part_score`` are the "normalized" scores of the requested order.
    """

    complement_eigenvalues: torch.Tensor
    text_part_eigenvalues: torch.Tensor
    sce: torch.Tensor
    text_part_score: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Checks of the arguments. The public ones (no underscore) are also the building blocks of the streaming
# module (clipfast.nn.SchurComplementEntropy) and the CLI (python -m clipfast.sce).
# ----------------------------------------------------------------------------------------------------

def _check_finite(t: torch.Tensor, name: str) -> None:
    # clipfast.inputs.NON_FINITE_RULE: the eigendecompositions would turn a NaN into garbage or a LAPACK
    # error, so it raises (ValueError on CPU; an async device assert on CUDA and under torch.compile).
    check_no_nan(t.detach(), name)


def _check_directions(t: torch.Tensor, name: str, kernel: str, convention: str) -> None:
    """The cosine kernels need a direction: a zero row ("normalized") or column ("clip-dissection") has none,
    and all-zero embeddings would give a zero covariance whose scores (1, 1) look valid."""
    if kernel != "cosine":
        return  # the Gaussian kernel of equal (e.g. zero) embeddings is a constant feature: score 1 is right
    dim, what = (1, "row") if convention == "normalized" else (0, "column")
    zero = (t.detach() == 0).all(dim=dim)
    message = (f"{name} has an all-zero {what}; the cosine kernel of a zero vector is undefined (the SCE of "
               "all-zero embeddings would read (1, 1), a valid-looking score)")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(zero.any()):
            raise ValueError(message + f": {what} {int(zero.nonzero()[0, 0])}")
    else:
        torch._assert_async(~zero.any(), "clipfast: " + message)


def check_pairs(image, text, image_name: str = "image_features", text_name: str = "text_features",
                min_rows: int = 2) -> None:
    """Checks paired embeddings ``image: (n, d)`` and ``text: (n, d)``: float tensors of one dtype and
    device, row i of ``text`` the prompt of row i of ``image``, ``n >= min_rows``, ``d >= 1``, no NaN/Inf
    (clipfast.inputs.NON_FINITE_RULE). Raises TypeError/ValueError naming ``image_name``/``text_name``."""
    for t, name in ((image, image_name), (text, text_name)):
        check_float_tensor(t, name, ("n", "d"))
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"{image_name} and {text_name} must be paired row by row, got {image.shape[0]} and "
                         f"{text.shape[0]} rows")
    if image.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} pairs, got {image.shape[0]}")
    check_feature_pair(image, text, image_name, text_name)  # one dtype, one device, one d >= 1
    _check_finite(image, image_name)
    _check_finite(text, text_name)


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sigma(sigma) -> float:
    if sigma is None:
        raise ValueError("kernel='gaussian' needs sigma (the bandwidth, > 0) or explicit omegas")
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def resolve_ridge(ridge: Optional[float], convention: str) -> float:
    """The ridge a split uses: ``ridge`` checked (finite, >= 0), or the convention's default when None
    (:data:`DEFAULT_RIDGE`, relative, for "normalized"; the published 1e-12, absolute, for "clip-dissection")."""
    if ridge is None:
        return PUBLISHED_RIDGE if convention == "clip-dissection" else DEFAULT_RIDGE
    if not _is_real(ridge) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def resolve_order(order: float, convention: str) -> float:
    """The Renyi order of the scores as a float: one of :data:`ORDERS` for "normalized", only 1 for
    "clip-dissection" (the published score). ValueError otherwise."""
    if convention == "clip-dissection":
        if order != 1:
            raise ValueError("convention='clip-dissection' has only the published order-1 score; "
                             f"got order={order!r} (use convention='normalized' for the Renyi family)")
        return 1.0
    if not _is_real(order) or float(order) not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return float(order)


def check_kernel_options(kernel: str, convention: str, sigma: Optional[float] = None, rff_dim: Optional[int] = None,
                         omegas: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> None:
    """Checks the kernel arguments of :func:`schur_complement` that do not need the data: ``kernel`` in
    :data:`KERNELS`, ``convention`` in :data:`CONVENTIONS`, and for "gaussian" either ``omegas: (d, m)`` or
    ``sigma > 0`` with ``rff_dim >= 1`` (none of them for "cosine"). Raises TypeError/ValueError."""
    _check_choice(kernel, "kernel", KERNELS)
    _check_choice(convention, "convention", CONVENTIONS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if kernel == "cosine":
        given = [name for name, v in (("sigma", sigma), ("rff_dim", rff_dim), ("omegas", omegas),
                                      ("generator", generator)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to kernel='gaussian' (got kernel='cosine')")
        return
    if omegas is not None:
        if sigma is not None or rff_dim is not None:
            raise ValueError("give either omegas or (sigma, rff_dim) for kernel='gaussian', not both: "
                             "omegas already fix the bandwidth and the number of features")
        if not isinstance(omegas, torch.Tensor):
            raise TypeError(f"omegas must be a torch.Tensor, got {type(omegas).__name__}")
        if omegas.dim() != 2 or omegas.shape[1] == 0:
            raise ValueError(f"omegas must be (d, m) with m >= 1, got shape {tuple(omegas.shape)}")
        if not omegas.is_floating_point():
            raise TypeError(f"omegas must be a floating-point tensor, got {omegas.dtype}")
        return
    _check_sigma(sigma)
    if rff_dim is None:
        raise ValueError("kernel='gaussian' needs rff_dim (the number m of random frequencies; F = 2m) "
                         "or explicit omegas")
    if not isinstance(rff_dim, numbers.Integral) or isinstance(rff_dim, bool) or rff_dim < 1:
        raise ValueError(f"rff_dim must be a positive integer, got {rff_dim!r}")


def prepare_omegas(omegas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Frequencies ``omegas: (d, m)`` checked against the embeddings ``like: (n, d)`` (d, device, finite),
    detached and cast to the computation dtype of ``like`` (float32, float64 for float64)."""
    if omegas.shape[0] != like.shape[1]:
        raise ValueError(f"omegas must have one row per embedding dimension: got {tuple(omegas.shape)} "
                         f"for d = {like.shape[1]}")
    if omegas.device != like.device:
        raise ValueError(f"omegas is on {omegas.device} but the features are on {like.device}")
    _check_finite(omegas, "omegas")
    return omegas.detach().to(compute_dtype(like.dtype))


def rff_omegas(dim: int, rff_dim: int, sigma: float, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Random Fourier frequencies of the Gaussian kernel ``k(u, v) = exp(-||u - v||^2 / (2 sigma^2))``.

    ``W = randn(dim, rff_dim) * (1 / sigma)``, drawn as the published code draws them: in float32 on the
    CPU (or on ``generator``'s device), then cast to ``dtype`` and moved to ``device``. With
    ``generator=None`` the draw comes from torch's global RNG, so ``torch.manual_seed(s)`` right before
    reproduces the published frequencies; float32 and float64 runs with one seed share the frequencies.

    Returns:
        (dim, rff_dim) tensor.
    """
    sigma = _check_sigma(sigma)
    for name, value in (("dim", dim), ("rff_dim", rff_dim)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    w = torch.randn((dim, rff_dim), generator=generator, dtype=torch.float32, device=draw_device)
    return (w * (1.0 / sigma)).to(dtype=dtype, device=device if device is not None else draw_device)


def covariance_kind(kernel: str, convention: str) -> str:
    """The covariance the op computes for a user's ``kernel`` and ``convention``
    (:data:`clipfast.reference.schur_covariance.COVARIANCES`): the published column cosine for "cosine" with
    "clip-dissection", the cosine of unit rows for "cosine" with "normalized", random Fourier features
    ("rff") for "gaussian" in both conventions."""
    if kernel == "gaussian":
        return "rff"
    return "column_cosine" if convention == "clip-dissection" else "row_cosine"


def _frequencies(image, kernel, sigma, rff_dim, omegas, generator) -> Optional[torch.Tensor]:
    """The (d, m) frequencies of the Gaussian kernel in the computation dtype, drawn when not given (after
    :func:`check_kernel_options`); None for the cosine kernel."""
    if kernel == "cosine":
        return None
    if omegas is None:
        omegas = rff_omegas(image.shape[1], int(rff_dim), sigma, generator=generator, device=image.device)
    return prepare_omegas(omegas, image)


# ----------------------------------------------------------------------------------------------------
# Linear algebra on the (F, F) blocks
# ----------------------------------------------------------------------------------------------------

def _identity(c: torch.Tensor) -> torch.Tensor:
    return torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def _published_inverse(c_tt: torch.Tensor, ridge: float) -> torch.Tensor:
    # pinv's default cut-off (max(F, F) * eps * sigma_max in c_tt's dtype) is what decides the published
    # numbers when C_tt is (near) singular, so it is kept, dtype included.
    return torch.linalg.pinv(c_tt + ridge * _identity(c_tt))


def _ridge_cholesky(c_tt: torch.Tensor, ridge: float) -> torch.Tensor:
    scale = ridge * torch.diagonal(c_tt).sum() / c_tt.shape[0]
    return torch.linalg.cholesky(c_tt + scale * _identity(c_tt))


def schur_split(c_tt: torch.Tensor, c_tx: torch.Tensor, c_xx: torch.Tensor, convention: str,
                ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(P, S)``: the text part ``P = C_tx^T C_tt^{-1} C_tx`` and the Schur complement ``S = C_xx - P`` of the
    ``(F, F)`` covariance blocks, with the convention's inverse and ridge (see :func:`schur_complement`;
    ``ridge`` as :func:`resolve_ridge` returns it). Differentiable; computed in the blocks' dtype."""
    if convention == "clip-dissection":
        text_part = c_tx.T @ _published_inverse(c_tt, ridge) @ c_tx
    else:
        # P = Y^T Y with Y = L^{-1} C_tx: symmetric and PSD by construction, so eigvalsh sees no
        # asymmetry noise and P has no negative eigenvalues beyond rounding.
        y = torch.linalg.solve_triangular(_ridge_cholesky(c_tt, ridge), c_tx, upper=False)
        text_part = y.T @ y
    return text_part, c_xx - text_part


def _regression(c_tt, c_tx, convention: str, ridge: float) -> torch.Tensor:
    """``A* = C_tt^{-1} C_tx`` in the convention's inverse."""
    if convention == "clip-dissection":
        return _published_inverse(c_tt, ridge) @ c_tx
    return torch.cholesky_solve(c_tx, _ridge_cholesky(c_tt, ridge), upper=False)


# ----------------------------------------------------------------------------------------------------
# Scores of a spectrum
# ----------------------------------------------------------------------------------------------------

def _published_spectrum_score(eigenvalues: torch.Tensor) -> torch.Tensor:
    lam = eigenvalues.clamp_min(PUBLISHED_EIGENVALUE_FLOOR)
    return torch.exp(-(lam * torch.log(lam / lam.sum())).sum())


def _normalized_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    # Negative eigenvalues of a PSD matrix are rounding: clamp_min passes no gradient to them.
    lam = eigenvalues.clamp_min(0)
    return lam / lam.sum()


def _renyi_score(p: torch.Tensor, order: float) -> torch.Tensor:
    """``exp(H_q(p))`` of a probability vector; zero entries contribute nothing, gradients included."""
    if order == math.inf:
        return 1.0 / p.max()
    if order == 1.0:
        positive = p > 0
        # where() on both sides keeps log(0) and its infinite derivative out of the graph.
        plogp = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))),
                            torch.zeros_like(p))
        return torch.exp(-plogp.sum())
    return torch.exp(torch.log((p ** order).sum()) / (1.0 - order))


def _spectrum_score(eigenvalues: torch.Tensor, convention: str, order: float) -> torch.Tensor:
    if convention == "clip-dissection":
        return _published_spectrum_score(eigenvalues)
    return _renyi_score(_normalized_spectrum(eigenvalues), order)


def matrix_score(matrix: torch.Tensor, convention: str, order: float) -> torch.Tensor:
    """The convention's score of a symmetric ``(F, F)`` matrix (see :func:`sce_score`): the published
    score for "clip-dissection" (``order`` 1), ``exp(H_q)`` of the trace-normalised spectrum for
    "normalized". 0-d, in the matrix's dtype, differentiable."""
    return _spectrum_score(torch.linalg.eigvalsh(matrix), convention, order)


def renyi_scores(matrix: torch.Tensor) -> Dict[float, torch.Tensor]:
    """The Vendi/Renyi family of a PSD matrix: ``{q: exp(H_q(p))}`` for q in (1, 1.5, 2, 2.5, inf).

    ``p = max(l, 0) / sum(max(l, 0))`` is the trace-normalised spectrum of ``matrix``;
    ``H_1 = -sum p log p``, ``H_q = log(sum p^q) / (1 - q)``, ``H_inf = -log max p``. Scores are
    non-increasing in q and lie in [1, rank]. The published ``calculate_stats`` reports the same orders
    but rounds to 2 decimals and does not renormalise by the trace (identical for trace-1 matrices).

    Args:
        matrix: (F, F) symmetric float tensor (only the lower triangle is read).

    Returns:
        dict from order (1.0, 1.5, 2.0, 2.5, math.inf) to a 0-d tensor of the matrix's dtype,
        differentiable. A zero matrix has no spectrum to normalise and gives NaN.
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be square (F, F) with F >= 1, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"matrix must be a floating-point tensor, got {matrix.dtype}")
    p = _normalized_spectrum(torch.linalg.eigvalsh(matrix))
    return {order: _renyi_score(p, order) for order in ORDERS}


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

def schur_complement(image_features: torch.Tensor, text_features: torch.Tensor, *, kernel: str = "cosine",
                     sigma: Optional[float] = None, rff_dim: Optional[int] = None,
                     omegas: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                     ridge: Optional[float] = None, convention: str = "normalized",
                     compute_dtype: Optional[torch.dtype] = None) -> SchurComplement:
    """Joint kernel covariance of paired embeddings and its Schur-complement split.

    Feature maps (``F`` features):

    - ``kernel="cosine"``, ``convention="normalized"``: ``phi(z) = z / ||z||``, ``C_ab = phi(A)^T phi(B) / n``
      (F = d, trace 1).
    - ``kernel="cosine"``, ``convention="clip-dissection"``: the published column cosine,
      ``A~ = A / max(colnorm(A), 1e-8)`` (column norms over the n samples), ``C_ab = A~^T B~ / d`` (F = d,
      trace 1; ``C_ab[i, j] = cos(A[:, i], B[:, j]) / d``).
    - ``kernel="gaussian"``: ``phi(z) = [cos(z W), sin(z W)] / sqrt(m)``, ``C_ab = phi(A)^T phi(B) / n``
      (F = 2m, trace 1), ``phi(u)^T phi(v) ~ exp(-||u - v||^2 / (2 sigma^2))``; ``W = omegas`` exactly, or
      ``rff_omegas(d, rff_dim, sigma, generator=generator)``.

    Then ``P = C_tx^T C_tt^{-1} C_tx`` and ``S = C_xx - P``, with the inverse

    - ``"clip-dissection"``: ``pinv(C_tt + ridge I)``, ``ridge`` absolute (default 1e-12, the published
      value), PyTorch's default pinv cut-off, in the covariance dtype;
    - ``"normalized"``: Cholesky of ``C_tt + ridge * tr(C_tt) / F * I``, ``ridge`` relative (default
      :data:`DEFAULT_RIDGE` = 1e-3, chosen so float32 and float64 agree: measured relative gap of the
      scores <= 1e-6 when C_tt is well posed, <= 3e-4 when it is singular (n = 2000 < F = 2500), where
      the published pinv path gives 1.00 vs 3.3),
      ``P = Y^T Y`` with ``Y = L^{-1} C_tx``. ``ridge=0`` gives the exact inverse when C_tt is positive
      definite. C_tt is singular whenever n < F or prompts repeat; the ridge then decides what S keeps.
      With F >= n that decision is below float32's resolution (1-10% between float32 and float64 at
      n = 500, F = 5000), so this convention then computes in float64 whatever the input dtype (see
      :func:`work_dtype`); ``compute_dtype=torch.float32`` opts out (faster, that imprecise).

    Args:
        image_features: (n, d) float16/bfloat16/float32/float64, raw or normalised embeddings.
        text_features: (n, d), same dtype and device; row i is image i's prompt. n >= 2.
        kernel: "cosine" or "gaussian". sigma: Gaussian bandwidth > 0 (with ``rff_dim``).
        rff_dim: number m of random frequencies (F = 2m). omegas: (d, m) frequencies, used as given
            (instead of sigma and rff_dim). generator: draws the frequencies reproducibly.
        ridge: see above. convention: "normalized" or "clip-dissection".
        compute_dtype: None (automatic, above), torch.float32 or torch.float64.

    Returns:
        :class:`SchurComplement`; all matrices (F, F), float32 (float64 for float64 inputs), differentiable
        w.r.t. both embedding matrices. Bitwise reproducible on CPU for a fixed thread count; drawn
        frequencies depend only on the generator's (or the global RNG's) state.

    Raises:
        TypeError: non-tensor or non-float inputs, mixed dtypes, bad ``generator``/``omegas`` type.
        ValueError: non-2-D inputs, n or d mismatch, n < 2, NaN/Inf values (clipfast.inputs.NON_FINITE_RULE:
        ValueError on CPU; an async device assert, a RuntimeError, on CUDA and under torch.compile), an
        all-zero row (column for "clip-dissection") with the cosine kernel, unknown kernel or convention,
        missing or non-positive sigma, missing rff_dim, omegas whose rows differ from d, cosine with Gaussian
        options, negative ridge.
        torch.linalg.LinAlgError: the Cholesky factor does not exist (ridge 0 with a singular C_tt).
    """
    split, out_dtype = _work_split(image_features, text_features, kernel, sigma, rff_dim, omegas, generator, ridge,
                                   convention, compute_dtype)
    if split.text_cov.dtype == out_dtype:
        return split
    cast = [m.to(out_dtype) for m in (split.text_cov, split.cross_cov, split.image_cov, split.text_part,
                                      split.complement)]
    return SchurComplement(*cast, split.omegas, kernel, convention, split.ridge)


def _work_split(image_features, text_features, kernel, sigma, rff_dim, omegas, generator, ridge, convention,
                compute_dtype_override):
    """``(split in the work dtype, output dtype)`` (see :func:`work_dtype`)."""
    check_pairs(image_features, text_features)
    check_kernel_options(kernel, convention, sigma, rff_dim, omegas, generator)
    _check_directions(image_features, "image_features", kernel, convention)
    _check_directions(text_features, "text_features", kernel, convention)
    ridge = resolve_ridge(ridge, convention)
    omegas = _frequencies(image_features, kernel, sigma, rff_dim, omegas, generator)
    features = image_features.shape[1] if omegas is None else 2 * omegas.shape[1]
    out_dtype = compute_dtype(image_features.dtype)
    dtype = work_dtype(image_features.dtype, convention, features, image_features.shape[0], compute_dtype_override)
    if dtype != out_dtype:
        image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        omegas = None if omegas is None else omegas.to(dtype)
    c_tt, c_tx, c_xx = kernel_covariance(image_features, text_features, covariance_kind(kernel, convention), omegas)
    text_part, complement = schur_split(c_tt, c_tx, c_xx, convention, ridge)
    return SchurComplement(c_tt, c_tx, c_xx, text_part, complement, omegas, kernel, convention, ridge), out_dtype


def sce_score(image_features: torch.Tensor, text_features: torch.Tensor, *, kernel: str = "cosine",
              sigma: Optional[float] = None, rff_dim: Optional[int] = None, omegas: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, ridge: Optional[float] = None,
              convention: str = "normalized", order: float = 1,
              compute_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Schur Complement Entropy score of the images and the score of the text part.

    ``(score(S), score(P))`` for the split of :func:`schur_complement` (same arguments), with ``l`` the
    eigenvalues of the matrix:

    - ``"clip-dissection"``: ``score(M) = exp(-sum_i l_i log(l_i / sum_j l_j))``, ``l`` clamped at 1e-10
      (the published score: unnormalised weights, so ``log score = tr(M) * H_1``); ``order`` must be 1.
    - ``"normalized"``: ``exp(H_q(p))``, ``p = max(l, 0) / sum max(l, 0)``, Renyi order
      ``q = order`` in (1, 1.5, 2, 2.5, inf) (see :func:`renyi_scores`): the effective number of
      directions of S, between 1 and F; it measures the shape of S, not its size (``tr(S) / tr(C_xx)``,
      the unexplained share, gives that).

    Returns:
        ``(sce, text_part_score)``: 0-d tensors, float32 (float64 for float64 inputs), differentiable
        w.r.t. both inputs (autograd through eigvalsh, exact for distinct eigenvalues; through pinv in
        "clip-dissection", whose derivative jumps where a singular value crosses the cut-off).

    Raises:
        As :func:`schur_complement`; ValueError for an unknown order, or order != 1 with
        "clip-dissection".
    """
    _check_choice(convention, "convention", CONVENTIONS)
    q = resolve_order(order, convention)
    split, out_dtype = _work_split(image_features, text_features, kernel, sigma, rff_dim, omegas, generator,
                                   ridge, convention, compute_dtype)
    return (matrix_score(split.complement, convention, q).to(out_dtype),
            matrix_score(split.text_part, convention, q).to(out_dtype))


def defocus(image_features: torch.Tensor, text_features: torch.Tensor, *,
            reference_images: Optional[torch.Tensor] = None, reference_texts: Optional[torch.Tensor] = None,
            kernel: str = "cosine", convention: str = "normalized", omegas: Optional[torch.Tensor] = None,
            ridge: Optional[float] = None, a_star: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Remove the prompt's direction from image embeddings: ``x' = x - t A*``, row by row.

    ``A* = C_tt^{-1} C_tx``, ``(F, F)``, from the covariance blocks of the REFERENCE pairs (the
    convention's inverse and ridge, as in :func:`schur_complement`): the uncentred least-squares map
    from text features to image features. The rows corrected are:

    - ``kernel="cosine"``, ``"clip-dissection"``: the raw embeddings, ``x - t A*`` (F = d), as published
      (A* from the column-cosine blocks).
    - ``kernel="cosine"``, ``"normalized"``: the unit rows, ``x/||x|| - (t/||t||) A*`` (F = d): the features
      A* was fitted on, so over the reference set the covariance of the corrected rows is S (exactly
      without ridge).
    - ``kernel="gaussian"``: random Fourier features, ``phi(x) - phi(t) A*`` (F = 2m), with the SAME
      ``omegas`` that fitted A*. (The published code draws fresh frequencies for text and for images
      here, so its corrected features are in a space unrelated to A*; that is a bug, not reproduced.)
      ``omegas`` is therefore required: draw it once, e.g. with :func:`rff_omegas`, and pass it to every
      call that reuses A*.

    Args:
        image_features: (k, d) float, the images to correct; text_features: (k, d), their prompts.
        reference_images, reference_texts: (n, d), n >= 2, the pairs A* is fitted on; not needed (and
            not read) when ``a_star`` is given.
        kernel, convention, ridge: as :func:`schur_complement`. omegas: (d, m), Gaussian kernel only.
        a_star: (F, F) from an earlier call, reused as is.

    Returns:
        ``(corrected, a_star)``: (k, F) and (F, F), float32 (float64 for float64 inputs), differentiable.

    Raises:
        As :func:`schur_complement`; ValueError when neither ``a_star`` nor both reference sets are given,
        when the Gaussian kernel comes without ``omegas``, or ``a_star`` is not (F, F).
    """
    check_pairs(image_features, text_features, min_rows=1)
    _check_choice(kernel, "kernel", KERNELS)
    _check_choice(convention, "convention", CONVENTIONS)
    if kernel == "gaussian" and omegas is None:
        raise ValueError("defocus with kernel='gaussian' needs omegas (d, m): the corrected features live in "
                         "that random-feature space and A* only holds for the frequencies it was fitted with; "
                         "draw them once with clipfast.rff_omegas(d, m, sigma) and pass them every time")
    check_kernel_options(kernel, convention, None, None, omegas, None)
    ridge = resolve_ridge(ridge, convention)
    dtype = compute_dtype(image_features.dtype)
    w = _frequencies(image_features, kernel, None, None, omegas, None)
    features = image_features.shape[1] if w is None else 2 * w.shape[1]

    if a_star is None:
        if reference_images is None or reference_texts is None:
            raise ValueError("defocus needs reference_images and reference_texts to fit A*, or a_star")
        check_pairs(reference_images, reference_texts, "reference_images", "reference_texts")
        if reference_images.shape[1] != image_features.shape[1]:
            raise ValueError(f"reference embeddings are {tuple(reference_images.shape)} but the features to "
                             f"correct are {tuple(image_features.shape)}: d differs")
        if reference_images.dtype != image_features.dtype:
            raise TypeError(f"reference embeddings are {reference_images.dtype} but the features to correct "
                            f"are {image_features.dtype}")
        if reference_images.device != image_features.device:
            raise ValueError(f"reference embeddings are on {reference_images.device} but the features to "
                             f"correct are on {image_features.device}")
        c_tt, c_tx, _ = kernel_covariance(reference_images, reference_texts, covariance_kind(kernel, convention), w)
        a_star = _regression(c_tt, c_tx, convention, ridge)
    else:
        if not isinstance(a_star, torch.Tensor) or not a_star.is_floating_point():
            raise TypeError("a_star must be a floating-point tensor")
        if tuple(a_star.shape) != (features, features):
            raise ValueError(f"a_star must be ({features}, {features}) for this kernel, got {tuple(a_star.shape)}")
        if a_star.device != image_features.device:
            raise ValueError(f"a_star is on {a_star.device} but the features are on {image_features.device}")
        a_star = a_star.to(dtype)

    x, t = image_features.to(dtype), text_features.to(dtype)
    if kernel == "gaussian":
        x, t = rff_features(x, w), rff_features(t, w)
    elif convention == "normalized":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x - t @ a_star, a_star


def exact_gaussian_schur(image_features: torch.Tensor, text_features: torch.Tensor, *, sigma: float,
                         ridge: float, order: float = 1) -> ExactGaussianSchur:
    """The Schur-complement split of the exact Gaussian kernel (no random features), in n-space.

    With ``k(u, v) = exp(-||u - v||^2 / (2 sigma^2))``, Grams ``K_tt = [k(t_i, t_j)]``, ``K_xx``, and the
    (infinite-dimensional) covariance operators ``C = Phi^T Phi / n``, an absolute ridge ``eta > 0`` gives
    by the push-through identity

        P(eta) = C_xt (C_tt + eta I)^{-1} C_tx = Phi_x^T K_tt (K_tt + n eta I)^{-1} Phi_x / n
        S(eta) = C_xx - P(eta)                 = eta Phi_x^T (K_tt + n eta I)^{-1} Phi_x

    whose non-zero spectra are those of the (n, n) matrices ``M^{1/2} K_xx M^{1/2} / n`` with
    ``M = K_tt (K_tt + n eta I)^{-1}`` and ``eta A^{1/2} K_xx A^{1/2}`` with ``A = (K_tt + n eta I)^{-1}``
    (one eigendecomposition of K_tt gives both square roots). Without a ridge S is exactly 0 (the exact
    kernel interpolates), hence ``ridge > 0``. O(n^2 d + n^3): a cross-check of the random-feature path
    for small n. The "normalized" RFF path with relative ridge ``r`` uses ``eta = r * tr(C_tt) / F = r / (2m)``,
    so ``ridge=eta`` here matches ``ridge=eta * 2 * m`` there; its scores approach these as m grows.

    Args:
        image_features, text_features: (n, d) float, paired, n >= 2. sigma: bandwidth > 0.
        ridge: absolute eta > 0. order: Renyi order of the "normalized" scores.

    Returns:
        :class:`ExactGaussianSchur`: ascending (n,) spectra of S and P (float32, float64 for float64
        inputs; ``sum = tr(C_xx) = 1``) and their scores.
    """
    check_pairs(image_features, text_features)
    sigma = _check_sigma(sigma)
    if not _is_real(ridge) or not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(f"ridge must be a finite number > 0 (with no ridge S is identically 0), got {ridge!r}")
    q = resolve_order(order, "normalized")
    dtype = compute_dtype(image_features.dtype)

    def gram(z):
        d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return torch.exp(-d2 / (2.0 * sigma * sigma))

    complement, text_part = _n_space_spectra(gram(text_features.to(dtype)), gram(image_features.to(dtype)), ridge)
    return ExactGaussianSchur(complement, text_part, _spectrum_score(complement, "normalized", q),
                              _spectrum_score(text_part, "normalized", q))


def _n_space_spectra(k_tt: torch.Tensor, k_xx: torch.Tensor, ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ascending spectra of ``S(eta)`` and ``P(eta)`` from the (n, n) Grams of any kernel (see
    :func:`exact_gaussian_schur`)."""
    n = k_tt.shape[0]
    mu, u = torch.linalg.eigh(k_tt)
    mu = mu.clamp_min(0)  # a Gram matrix is PSD; negative eigenvalues are rounding
    shifted = mu + n * ridge
    a_half = (u * shifted.rsqrt()) @ u.T
    m_half = (u * torch.sqrt(mu / shifted)) @ u.T
    return (torch.linalg.eigvalsh(ridge * (a_half @ k_xx @ a_half)),
            torch.linalg.eigvalsh(m_half @ k_xx @ m_half / n))


__all__ = [
    "CONVENTIONS",
    "DEFAULT_RIDGE",
    "ExactGaussianSchur",
    "KERNELS",
    "ORDERS",
    "SchurComplement",
    "check_kernel_options",
    "check_pairs",
    "covariance_kind",
    "defocus",
    "exact_gaussian_schur",
    "matrix_score",
    "prepare_omegas",
    "renyi_scores",
    "resolve_order",
    "resolve_ridge",
    "rff_features",
    "rff_omegas",
    "sce_score",
    "schur_complement",
    "schur_split",
    "work_dtype",
]
