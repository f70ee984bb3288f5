"""User-facing functions: input checks, then the registered ops of :mod:`clipfast.ops`.

All losses here are computed tile by tile: nothing of size N x M is ever allocated, forward or
backward. Extra memory is O((N + M) * D).
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from clipfast.ops import contrastive as _ops

Scalar = Union[torch.Tensor, float]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_features(image_features, text_features, name_a="image_features", name_b="text_features"):
    for name, t in ((name_a, image_features), (name_b, text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); the loss is undefined")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0 (shape {tuple(t.shape)})")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"{name_a} and {name_b} dtypes differ: {image_features.dtype} vs {text_features.dtype}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature dimensions differ: {name_a} {tuple(image_features.shape)}, "
                         f"{name_b} {tuple(text_features.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(f"{name_a} is on {image_features.device} but {name_b} on {text_features.device}")


def _as_scalar_tensor(value: Optional[Scalar], name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A one-element float tensor on ``like``'s device; Python numbers are converted, shapes kept."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a float, got {type(value).__name__}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a 0-d or shape [1] tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
              logit_bias: Optional[Scalar] = None, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, exactly as open_clip's ``ClipLoss`` (world size 1), fused.

    With ``X = logit_scale * image_features @ text_features.T (+ logit_bias)``, shape (N, N), never
    materialised::

        loss = (cross_entropy(X, arange(N)) + cross_entropy(X.T, arange(N))) / 2

    where ``cross_entropy`` is ``torch.nn.functional.cross_entropy`` with ``label_smoothing``.

    Args:
        image_features: (N, D) float16/bfloat16/float32/float64; need not be normalised.
        text_features: (N, D), same dtype and device.
        logit_scale: 0-d or [1] tensor (or float), ALREADY exponentiated (open_clip passes
            ``model.logit_scale.exp()``); must be finite and >= 0.
        logit_bias: optional 0-d or [1] tensor. The loss is invariant to it (softmax is
            shift-invariant); its gradient is an exact zero of its shape.
        label_smoothing: in [0, 1], as in ``F.cross_entropy``, applied in both directions.

    Returns:
        0-d float32 tensor (float64 for float64 inputs). Gradients flow to both feature matrices
        (in their dtype), to ``logit_scale`` (its shape) and to ``logit_bias``.

    Raises:
        TypeError: non-tensor, integer or mixed dtypes. ValueError: empty batch, N != M, D mismatch,
        mixed devices, non-finite or negative ``logit_scale`` (on a GPU this check is an async device
        assert, to avoid a host sync), ``label_smoothing`` outside [0, 1].

    Numerics: bf16/fp16 inputs accumulate in fp32. NaN or Inf in the features propagate to a NaN
    (or Inf) loss; nothing is silently masked. Non-contiguous and expanded inputs are accepted (made
    contiguous, O(N*D)). CPU results are bitwise reproducible for a fixed number of threads.
    """
    _check_features(image_features, text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"the symmetric CLIP loss needs as many images as texts, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}; "
                         "use contrastive_cross_entropy for a rectangular block")
    return _infonce(image_features, text_features, logit_scale, logit_bias, 0, label_smoothing, True)


def contrastive_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, logit_scale: Scalar,
                              logit_bias: Optional[Scalar] = None, *, label_offset: int = 0,
                              label_smoothing: float = 0.0) -> torch.Tensor:
    """One direction of InfoNCE over a rectangular block (the building block of distributed losses).

    ``loss = mean_i cross_entropy(logit_scale * queries[i] @ keys.T, label_offset + i)``.

    Args:
        queries: (n, D) float; keys: (M, D), same dtype/device, with ``label_offset + n <= M``
            (open_clip's local loss: queries = this rank's features, keys = all ranks' features,
            ``label_offset = rank * n``).
        logit_scale, logit_bias, label_smoothing: as in :func:`clip_loss`.

    Returns:
        0-d float32 (float64 for float64 inputs).
    """
    _check_features(queries, keys, "queries", "keys")
    if not isinstance(label_offset, int) or label_offset < 0 or label_offset + queries.shape[0] > keys.shape[0]:
        raise ValueError(f"label_offset={label_offset!r} with {queries.shape[0]} queries needs "
                         f"0 <= label_offset <= {keys.shape[0] - queries.shape[0]} for {keys.shape[0]} keys")
    return _infonce(queries, keys, logit_scale, logit_bias, label_offset, label_smoothing, False)


def _infonce(queries, keys, logit_scale, logit_bias, label_offset, label_smoothing, symmetric):
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    scale = _as_scalar_tensor(logit_scale, "logit_scale", queries)
    bias = _as_scalar_tensor(logit_bias, "logit_bias", queries)
    loss, _, _ = _ops.contrastive_loss(queries, keys, scale, bias, label_offset, symmetric,
                                       float(label_smoothing))
    return loss


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
                logit_bias: Scalar, *, label_offset: int = 0, negative_only: bool = False) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, exactly as open_clip's ``SigLipLoss`` (world size 1), fused.

    With ``X = logit_scale * image_features @ text_features.T + logit_bias``, shape (N, M), never
    materialised, and ``z_ij = +1`` on the positive pairs ``(i, label_offset + i)``, -1 elsewhere
    (all -1 when ``negative_only``, open_clip's remote blocks)::

        loss = -sum_ij logsigmoid(z_ij * X_ij) / N
             = (sum_ij softplus(X_ij) - sum_i X_{i, label_offset+i}) / N

    Args:
        image_features: (N, D) float; text_features: (M, D), same dtype/device; M == N unless
            ``label_offset``/``negative_only`` describe a block of a larger batch.
        logit_scale: 0-d or [1] tensor (or float), already exponentiated, finite, >= 0.
        logit_bias: 0-d or [1] tensor (or float), required, finite.

    Returns:
        0-d float32 (float64 for float64 inputs); gradients for both features, ``logit_scale``
        and ``logit_bias``. Raises and numerics as :func:`clip_loss`.
    """
    _check_features(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if logit_bias is None:
        raise ValueError("siglip_loss needs logit_bias (SigLIP learns one; open_clip passes model.logit_bias)")
    if not negative_only and (not isinstance(label_offset, int) or label_offset < 0 or label_offset + n > m):
        raise ValueError(f"label_offset={label_offset!r} with {n} images needs 0 <= label_offset <= {m - n} "
                         f"for {m} texts (N != M needs negative_only=True or a label_offset)")
    scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    return _ops.siglip_loss(image_features, text_features, scale, bias, int(label_offset), bool(negative_only))
