"""Registration of the kernel-covariance core of the Schur-complement op (custom ops, fakes, autograd).

Ops (``mutates_args=()``), with ``covariance`` one of ``"column_cosine"``, ``"row_cosine"``, ``"rff"``
(:data:`clipfast.reference.schur_covariance.COVARIANCES`, the one vocabulary of every layer):

- ``clipfast::schur_covariance_gram(image, text, covariance, omegas) -> (S_tt, S_tx, S_xx)``: the feature
  Gram sums of :mod:`clipfast.reference.schur_covariance`, each ``(F, F)``, fp32 (fp64 for fp64 inputs), in
  one tiled pass over the n pairs: the ``(n, F)`` feature matrices (``n x 2m`` for random Fourier
  features) never exist.
- ``clipfast::schur_covariance_gram_backward(G_tt, G_tx, G_xx, image, text, covariance, omegas)
  -> (d_image, d_text)``.

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
from clipfast.reference.schur_covariance import COVARIANCES, covariance_from_gram

__all__ = ["COVARIANCES", "covariance_from_gram", "kernel_covariance", "schur_covariance_gram",
           "schur_covariance_gram_backward"]


class SchurCovarianceKernels(NamedTuple):
    """The two kernels every backend provides; contract: :mod:`clipfast.reference.schur_covariance`."""
    gram: Callable  # (image, text, covariance, omegas) -> (S_tt, S_tx, S_xx)
    gram_backward: Callable  # (G_tt, G_tx, G_xx, image, text, covariance, omegas) -> (d_image, d_text)


def _reference_gram(image, text, covariance, omegas):
    with torch.no_grad():
        return tuple(g.contiguous() for g in reference.schur_covariance_gram_reference(image, text, covariance, omegas))


def _triton_kernels() -> SchurCovarianceKernels:
    from clipfast.triton_kernels import schur_covariance as triton

    return SchurCovarianceKernels(triton.schur_covariance_gram_triton, triton.schur_covariance_gram_backward_triton)


def _gram_fake(image, text, covariance, omegas):
    f = 2 * omegas.shape[1] if covariance == "rff" else image.shape[1]
    return tuple(image.new_empty((f, f), dtype=compute_dtype(image.dtype)) for _ in range(3))


def _gram_backward_fake(grad_tt, grad_tx, grad_xx, image, text, covariance, omegas):
    return torch.empty_like(image), torch.empty_like(text)


KERNELS = backends.OpKernels(
    "schur_covariance",
    reference=SchurCovarianceKernels(_reference_gram, reference.schur_covariance_gram_backward_reference),
    native=SchurCovarianceKernels("schur_covariance_gram", "schur_covariance_gram_backward"), triton=_triton_kernels,
    native_fakes=SchurCovarianceKernels(_gram_fake, _gram_backward_fake))


@torch.library.custom_op("clipfast::schur_covariance_gram", mutates_args=())
def schur_covariance_gram(image: torch.Tensor, text: torch.Tensor, covariance: str,
                          omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    reference.check_covariance(covariance)
    return KERNELS.for_inputs(image).gram(image, text, covariance, omegas)


@torch.library.custom_op("clipfast::schur_covariance_gram_backward", mutates_args=())
def schur_covariance_gram_backward(grad_tt: torch.Tensor, grad_tx: torch.Tensor, grad_xx: torch.Tensor,
                                   image: torch.Tensor, text: torch.Tensor, covariance: str,
                                   omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    reference.check_covariance(covariance)
    return KERNELS.for_inputs(image).gram_backward(grad_tt, grad_tx, grad_xx, image, text, covariance, omegas)


schur_covariance_gram.register_fake(_gram_fake)
schur_covariance_gram_backward.register_fake(_gram_backward_fake)


def _setup_context(ctx, inputs, output):
    image, text, covariance, omegas = inputs
    ctx.save_for_backward(image, text, omegas)
    ctx.covariance = covariance


def _backward(ctx, grad_tt, grad_tx, grad_xx):
    image, text, omegas = ctx.saved_tensors
    d_image, d_text = schur_covariance_gram_backward(grad_tt, grad_tx, grad_xx, image, text, ctx.covariance, omegas)
    return d_image, d_text, None, None


schur_covariance_gram.register_autograd(_backward, setup_context=_setup_context)


def kernel_covariance(image: torch.Tensor, text: torch.Tensor, covariance: str,
                      omegas: Optional[torch.Tensor] = None):
    """``(C_tt, C_tx, C_xx)``, each ``(F, F)``, of n paired rows, differentiable w.r.t. both inputs.

    Args:
        image, text: (n, d) float, paired by row.
        covariance: ``"column_cosine"`` (the published "cosine" kernel: column-normalised, / d),
            ``"row_cosine"`` (``phi(z) = z / ||z||``, / n) or ``"rff"`` (random Fourier features with
            ``omegas: (d, m)``, / n). See :mod:`clipfast.reference.schur_covariance`.

    Returns:
        Three (F, F) tensors, fp32 (fp64 for fp64 inputs); F = d, or 2m for ``"rff"``; ``C_tx`` has the
        text features on its rows.
    """
    grams = schur_covariance_gram(image, text, covariance, omegas)
    return covariance_from_gram(*grams, covariance, image.shape[0])
