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

import functools
from types import SimpleNamespace
from typing import Optional

import torch

from clipfast import backends
from clipfast.dtypes import compute_dtype
from clipfast.reference import schur_covariance as reference

OP = "schur_covariance"


def _backend(t: torch.Tensor) -> str:
    return backends.select(OP, t.device, t.dtype)


def _reference_gram(text, image, feature_map, omegas):
    with torch.no_grad():
        return tuple(g.contiguous() for g in reference.feature_gram_reference(text, image, feature_map, omegas))


def kernels(backend: str) -> SimpleNamespace:
    """``gram`` and ``gram_backward`` of ``backend`` (the contract of the ``clipfast_C`` ops)."""
    if backend == "reference":
        return SimpleNamespace(gram=_reference_gram, gram_backward=reference.feature_gram_backward_reference)
    if backend == "triton":
        from clipfast.triton_kernels import schur_covariance as triton_schur

        precision = {"input_precision": backends.triton_input_precision()}
        return SimpleNamespace(gram=functools.partial(triton_schur.feature_gram_triton, **precision),
                               gram_backward=functools.partial(triton_schur.feature_gram_backward_triton, **precision))
    if backend in ("cpu", "cuda"):  # one native op, dispatched on the tensors' device
        return SimpleNamespace(gram=torch.ops.clipfast_C.feature_gram,
                               gram_backward=torch.ops.clipfast_C.feature_gram_backward)
    raise ValueError(f"unknown backend {backend!r}")


def _check_feature_map(feature_map: str) -> None:
    if feature_map not in reference.FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {reference.FEATURE_MAPS}, got {feature_map!r}")


def _features(text: torch.Tensor, feature_map: str, omegas: Optional[torch.Tensor]) -> int:
    return 2 * omegas.shape[1] if feature_map == "rff" else text.shape[1]


@torch.library.custom_op("clipfast::feature_gram", mutates_args=())
def feature_gram(text: torch.Tensor, image: torch.Tensor, feature_map: str,
                 omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_feature_map(feature_map)
    return kernels(_backend(text)).gram(text, image, feature_map, omegas)


@torch.library.custom_op("clipfast::feature_gram_backward", mutates_args=())
def feature_gram_backward(grad_tt: torch.Tensor, grad_tx: torch.Tensor, grad_xx: torch.Tensor,
                          text: torch.Tensor, image: torch.Tensor, feature_map: str,
                          omegas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_feature_map(feature_map)
    return kernels(_backend(text)).gram_backward(grad_tt, grad_tx, grad_xx, text, image, feature_map, omegas)


@feature_gram_backward.register_fake
def _(grad_tt, grad_tx, grad_xx, text, image, feature_map, omegas):
    return torch.empty_like(text), torch.empty_like(image)


def _setup_context(ctx, inputs, output):
    text, image, feature_map, omegas = inputs
    ctx.save_for_backward(text, image, omegas)
    ctx.feature_map = feature_map


def _backward(ctx, grad_tt, grad_tx, grad_xx):
    text, image, omegas = ctx.saved_tensors
    d_text, d_image = feature_gram_backward(grad_tt, grad_tx, grad_xx, text, image, ctx.feature_map, omegas)
    return d_text, d_image, None, None


feature_gram.register_autograd(_backward, setup_context=_setup_context)


def _gram_fake(text, image, feature_map, omegas):
    f = _features(text, feature_map, omegas)
    return tuple(text.new_empty((f, f), dtype=compute_dtype(text.dtype)) for _ in range(3))


feature_gram.register_fake(_gram_fake)


def _register_native_fakes() -> None:
    torch.library.register_fake("clipfast_C::feature_gram")(_gram_fake)
    torch.library.register_fake("clipfast_C::feature_gram_backward")(
        lambda g_tt, g_tx, g_xx, text, image, feature_map, omegas: (torch.empty_like(text), torch.empty_like(image)))


if backends.native_available():
    _register_native_fakes()


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
