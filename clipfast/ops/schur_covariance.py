"""Registration of the kernel-covariance core of the Schur-complement op (custom ops, fakes, autograd).

Ops (``mutates_args=()``):

- ``clipfast::feature_gram(text, image, feature_map, omegas) -> (S_tt, S_tx, S_xx)``: the feature Gram
  sums of :mod:`clipfast.reference.schur_covariance`, each ``(F, F)``, fp32 (fp64 for fp64 inputs), in
  one tiled pass over the n pairs: the ``(n, F)`` feature matrices (``n x 2m`` for random Fourier
  features) never exist.
- ``clipfast::feature_gram_backward(G_tt, G_tx, G_xx, text, image, feature_map, omegas) -> (dT, dX)``.

:func:`kernel_covariance` builds the covariance blocks from the sums with O(F^2) tensor operations,
so autograd reaches the embeddings through the registered op. ``omegas`` (the RFF frequencies) are
data, not parameters: they get no gradient.

Backends: ``cpu`` (C++, csrc/cpu/schur_covariance.cpp), ``triton`` (triton_kernels/schur_covariance.py),
``cuda`` (csrc/cuda/schur_covariance.cu, opt-in) and ``reference`` (plain PyTorch, any device).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from clipfast import backends
from clipfast.dtypes import compute_dtype
from clipfast.reference import schur_covariance as reference


class SchurCovarianceKernels(NamedTuple):
    """The two kernels every backend provides; contract: :mod:`clipfast.reference.schur_covariance`."""
    gram: Callable  # (text, image, feature_map, omegas) -> (S_tt, S_tx, S_xx)
    gram_backward: Callable  # (G_tt, G_tx, G_xx, text, image, feature_map, omegas) -> (dT, dX)


def _reference_gram(text, image, feature_map, omegas):
    with torch.no_grad():
        return tuple(g.contiguous() for g in reference.feature_gram_reference(text, image, feature_map, omegas))


def _triton_kernels() -> SchurCovarianceKernels:
    from clipfast.triton_kernels import schur_covariance as triton

    return SchurCovarianceKernels(triton.feature_gram_triton, triton.feature_gram_backward_triton)


def _features(text: torch.Tensor, feature_map: str, omegas: Optional[torch.Tensor]) -> int:
    return 2 * omegas.shape[1] if feature_map == "rff" else text.shape[1]


def _gram_fake(text, image, feature_map, omegas):
    f = _features(text, feature_map, omegas)
    return tuple(text.new_empty((f, f), dtype=compute_dtype(text.dtype)) for _ in range(3))


def _gram_backward_fake(grad_tt, grad_tx, grad_xx, text, image, feature_map, omegas):
    return torch.empty_like(text), torch.empty_like(image)


KERNELS = backends.OpKernels(
    "schur_covariance",
    reference=SchurCovarianceKernels(_reference_gram, reference.feature_gram_backward_reference),
    native=SchurCovarianceKernels("feature_gram", "feature_gram_backward"), triton=_triton_kernels,
    native_fakes=SchurCovarianceKernels(_gram_fake, _gram_backward_fake))


def _check_feature_map(feature_map: str) -> None:
    if feature_map not in reference.FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {reference.FEATURE_MAPS}, got {feature_map!r}")


@torch.library.custom_op("clipfast::feature_gram", mutates_args=())
def feature_gram(text: torch.Tensor, image: torch.Tensor, feature_map: str,
                 omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_feature_map(feature_map)
    return KERNELS.for_inputs(text).gram(text, image, feature_map, omegas)


@torch.library.custom_op("clipfast::feature_gram_backward", mutates_args=())
def feature_gram_backward(grad_tt: torch.Tensor, grad_tx: torch.Tensor, grad_xx: torch.Tensor,
                          text: torch.Tensor, image: torch.Tensor, feature_map: str,
                          omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_feature_map(feature_map)
    return KERNELS.for_inputs(text).gram_backward(grad_tt, grad_tx, grad_xx, text, image, feature_map, omegas)


feature_gram.register_fake(_gram_fake)
feature_gram_backward.register_fake(_gram_backward_fake)


def _setup_context(ctx, inputs, output):
    text, image, feature_map, omegas = inputs
    ctx.save_for_backward(text, image, omegas)
    ctx.feature_map = feature_map


def _backward(ctx, grad_tt, grad_tx, grad_xx):
    text, image, omegas = ctx.saved_tensors
    d_text, d_image = feature_gram_backward(grad_tt, grad_tx, grad_xx, text, image, ctx.feature_map, omegas)
    return d_text, d_image, None, None


feature_gram.register_autograd(_backward, setup_context=_setup_context)


def kernel_covariance(text: torch.Tensor, image: torch.Tensor, feature_map: str,
                      omegas: Optional[torch.Tensor] = None):
    """``(C_tt, C_tx, C_xx)``, each ``(F, F)``, of n paired rows, differentiable w.r.t. both inputs.

    Args:
        text, image: (n, d) float, paired by row.
        feature_map: ``"column_cosine"`` (the published "cosine" kernel: column-normalised, / d),
            ``"row_cosine"`` (``phi(z) = z / ||z||``, / n) or ``"rff"`` (random Fourier features with
            ``omegas: (d, m)``, / n). See :mod:`clipfast.reference.schur_covariance`.

    Returns:
        Three (F, F) tensors, fp32 (fp64 for fp64 inputs); F = d, or 2m for ``"rff"``.
    """
    if feature_map not in reference.COVARIANCES:
        raise ValueError(f"feature_map must be one of {reference.COVARIANCES}, got {feature_map!r}")
    grams = feature_gram(text, image, reference.FEATURE_MAP_OF[feature_map], omegas)
    return reference.covariance_from_gram(*grams, feature_map, text.shape[0])
