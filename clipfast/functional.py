"""User-facing functions: input checks, then the registered ops of :mod:`clipfast.ops`.

All losses here are computed tile by tile: nothing of size N x M is ever allocated, forward or
backward. Extra memory is O((N + M) * D).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Tuple, Union

import torch

from clipfast.dtypes import compute_dtype
from clipfast.inputs import NON_FINITE_RULE, as_int, check_no_nan, int_in_range, is_int_like  # noqa: F401  (re-exported)
from clipfast.ops import contrastive as _ops

Scalar = Union[torch.Tensor, float]
GroupIds = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # (N,) ids, or (row_ids (N,), col_ids (M,))
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(t, name: str, layout: tuple) -> None:
    """TypeError unless ``t`` is a float tensor, ValueError unless it has ``len(layout)`` dimensions;
    ``layout`` names them for the message, e.g. ``("n", "d")``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(layout):
        raise ValueError(f"{name} must be {len(layout)}-D ({', '.join(layout)}), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_feature_pair(image_features, text_features, name_a="image_features", name_b="text_features"):
    """TypeError / ValueError unless both are non-empty 2-D float tensors of one dtype, one D and one device."""
    for name, t in ((name_a, image_features), (name_b, text_features)):
        check_float_tensor(t, name, ("batch", "dim"))
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


def _autocast_features(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under ``torch.autocast``, fp32 features go into the products in the autocast dtype, as the matmul of
    open_clip's loss does there; the scale, the bias and the loss stay fp32 and the gradients come back to
    the features in fp32 (the cast is differentiable)."""
    device_type = a.device.type
    if a.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return a.to(dtype), b.to(dtype)
    return a, b


def as_scalar_tensor(value: Optional[Scalar], name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
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
              logit_bias: Optional[Scalar] = None, *, label_smoothing: float = 0.0,
              labels: Optional[torch.Tensor] = None, group_ids: Optional[GroupIds] = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, exactly as open_clip's ``ClipLoss`` (world size 1), fused.

    With ``X = logit_scale * image_features @ text_features.T (+ logit_bias)``, shape (N, N), never
    materialised::

        loss = (cross_entropy(X, arange(N)) + cross_entropy(X.T, arange(N))) / 2

    where ``cross_entropy`` is ``torch.nn.functional.cross_entropy`` with ``label_smoothing``.

    Other positives (both O(N) extra memory, the same kernels; see :data:`MULTI_POSITIVE`):
    ``labels`` (N,) integer: image i's positive text is ``labels[i]`` (Inf-CL's convention); every text
    needs a positive image (a permutation gives one each; a text with several gets their average).
    ``group_ids``: image i and text j are a positive pair when their ids are equal (COCO's five captions
    of one image, repeated web pairs): one (N,) integer tensor for the pairs of the batch, or
    ``(image_ids (N,), text_ids (N,))``; every image and every text needs a positive.

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

    Numerics: bf16/fp16 inputs accumulate in fp32. Under ``torch.autocast`` fp32 features multiply in
    the autocast dtype, as open_clip's matmul does there (loss and scale stay fp32); outside it, fp32
    features on a GPU follow PyTorch's float32 matmul precision (exact fp32 by default, tf32 under
    ``"high"``). NaN or Inf in the features propagate to a NaN (or Inf) loss; nothing is silently
    masked. Non-contiguous and expanded inputs are accepted (made contiguous, O(N*D)). CPU results are bitwise reproducible for a fixed number of threads.
    """
    check_feature_pair(image_features, text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"the symmetric CLIP loss needs as many images as texts, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}; "
                         "use contrastive_cross_entropy for a rectangular block")
    ids = positive_ids(image_features, text_features, labels, group_ids)
    return _infonce(image_features, text_features, logit_scale, logit_bias, 0, label_smoothing, True, ids)


def contrastive_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, logit_scale: Scalar,
                              logit_bias: Optional[Scalar] = None, *, label_offset: int = 0,
                              label_smoothing: float = 0.0, labels: Optional[torch.Tensor] = None,
                              group_ids: Optional[GroupIds] = None) -> torch.Tensor:
    """One direction of InfoNCE over a rectangular block (the building block of distributed losses).

    ``loss = mean_i cross_entropy(logit_scale * queries[i] @ keys.T, label_offset + i)``.

    Args:
        queries: (n, D) float; keys: (M, D), same dtype/device, with ``label_offset + n <= M``
            (open_clip's local loss: queries = this rank's features, keys = all ranks' features,
            ``label_offset = rank * n``).
        logit_scale, logit_bias, label_smoothing: as in :func:`clip_loss`.
        labels: instead of ``label_offset``, (n,) integer target columns in [0, M), any order or
            repetition (Inf-CL's ``labels``).
        group_ids: instead, ``(query_ids (n,), key_ids (M,))``: row i's targets are uniform over the keys
            with its id (:data:`MULTI_POSITIVE`); every query needs one.

    Returns:
        0-d float32 (float64 for float64 inputs).
    """
    check_feature_pair(queries, keys, "queries", "keys")
    label_offset = as_int(label_offset, "label_offset")
    if label_offset < 0 or label_offset + queries.shape[0] > keys.shape[0]:
        raise ValueError(f"label_offset={label_offset!r} with {queries.shape[0]} queries needs "
                         f"0 <= label_offset <= {keys.shape[0] - queries.shape[0]} for {keys.shape[0]} keys")
    ids = positive_ids(queries, keys, labels, group_ids)
    if ids is not None and label_offset:
        raise ValueError("give label_offset, labels or group_ids, not several")
    return _infonce(queries, keys, logit_scale, logit_bias, label_offset, label_smoothing, False, ids)


def _infonce(queries, keys, logit_scale, logit_bias, label_offset, label_smoothing, symmetric, ids):
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    scale = as_scalar_tensor(logit_scale, "logit_scale", queries)
    bias = as_scalar_tensor(logit_bias, "logit_bias", queries)
    queries, keys = _autocast_features(queries, keys)
    row_ids, col_ids = ids if ids is not None else (None, None)
    loss, _, _ = _ops.contrastive_loss(queries, keys, scale, bias, label_offset, symmetric,
                                       float(label_smoothing), row_ids, col_ids)
    return loss


MULTI_POSITIVE = """Multi-positive InfoNCE (``group_ids``), the formula.

Pair (i, j) is positive when ``row_ids[i] == col_ids[j]``; ``P(i)`` are row i's positive columns,
``Q(j)`` column j's positive rows. Each direction's target distribution is uniform over the positives::

    L_row = mean_i [ logsumexp_j X_ij - mean_{j in P(i)} X_ij ]
    L_col = mean_j [ logsumexp_i X_ij - mean_{i in Q(j)} X_ij ]
    clip_loss = (L_row + L_col) / 2,    contrastive_cross_entropy = L_row

This is UniCL's bidirectional image-label-text loss (Yang et al., CVPR 2022, "Unified Contrastive
Learning in Image-Text-Label Space", eqs. 2-4: the target of each row is ``1/|P(i)|`` on its positives),
with each direction averaged over its rows as CLIP does; with distinct ids it is CLIP's loss exactly.
``label_smoothing`` mixes in the uniform distribution over all columns, as ``F.cross_entropy`` does.
Fused: the kernels are those of the one-positive loss (the log-sum-exps do not depend on the labels);
the label terms need per-id feature sums, ``O((N + M) D)`` (one sort of the ids). SigLIP's form
(:func:`siglip_loss`) takes ``z_ij = +1`` on every positive pair.
"""


def positive_ids(queries: torch.Tensor, keys: torch.Tensor, labels: Optional[torch.Tensor],
                 group_ids: Optional[GroupIds]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(row_ids (N,), col_ids (M,))`` int64 describing the positive pairs, or None for the default
    diagonal. ``labels`` (N,) become ``(labels, arange(M))``; ``group_ids`` is one (N,) tensor for a
    square batch (rows and columns are the same pairs) or a pair of tensors. TypeError / ValueError on
    a wrong dtype, shape or device, labels outside [0, M) (checked on the CPU; a device assert elsewhere)."""
    if labels is None and group_ids is None:
        return None
    if labels is not None and group_ids is not None:
        raise ValueError("give labels or group_ids, not both")
    n, m = queries.shape[0], keys.shape[0]

    def as_ids(t, name, length):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but the features are on {queries.device}")
        return t.detach().to(torch.int64)

    if labels is not None:
        labels = as_ids(labels, "labels", n)
        in_range = ((labels >= 0) & (labels < m)).all()
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range):
                raise ValueError(f"labels must lie in [0, {m}) (the columns), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        else:
            torch._assert_async(in_range, f"clipfast: labels must lie in [0, {m})")
        return labels, torch.arange(m, device=labels.device)
    if isinstance(group_ids, torch.Tensor):
        if n != m:
            raise ValueError(f"one group_ids tensor describes a square batch; with {n} rows and {m} columns "
                             "give (row_ids, col_ids)")
        ids = as_ids(group_ids, "group_ids", n)
        return ids, ids
    if not (isinstance(group_ids, (tuple, list)) and len(group_ids) == 2):
        raise TypeError("group_ids must be a tensor or a pair (row_ids, col_ids) of tensors")
    return as_ids(group_ids[0], "group_ids[0] (rows)", n), as_ids(group_ids[1], "group_ids[1] (columns)", m)


def _check_teacher(features: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
    check_float_tensor(teacher, name, ("batch", "dim"))
    if teacher.shape[0] != features.shape[0]:
        raise ValueError(f"{name} must have one row per student row: {teacher.shape[0]} vs {features.shape[0]}")
    if teacher.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if teacher.device != features.device:
        raise ValueError(f"{name} is on {teacher.device} but the student's features on {features.device}")
    if teacher.requires_grad:
        raise ValueError(f"{name} requires grad: the distillation teacher is frozen (compute it under "
                         "torch.no_grad() or .detach() it, as open_clip's training loop does)")
    return teacher.to(features.dtype)


def _distill(queries, keys, logit_scale, teacher_queries, teacher_keys, teacher_logit_scale, label_offset,
             symmetric):
    scale = as_scalar_tensor(logit_scale, "logit_scale", queries)
    teacher_scale = as_scalar_tensor(teacher_logit_scale, "teacher_logit_scale", queries)
    if teacher_scale.requires_grad:
        raise ValueError("teacher_logit_scale requires grad: the distillation teacher is frozen")
    queries, keys = _autocast_features(queries, keys)
    teacher_queries = _check_teacher(queries, teacher_queries, "teacher queries")
    teacher_keys = _check_teacher(keys, teacher_keys, "teacher keys")
    check_feature_pair(teacher_queries, teacher_keys, "teacher queries", "teacher keys")
    contrastive, distill, *_ = _ops.distill_loss(queries, keys, scale, teacher_queries, teacher_keys, teacher_scale,
                                                 label_offset, symmetric)
    return contrastive, distill


def clip_distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
                      teacher_image_features: torch.Tensor, teacher_text_features: torch.Tensor,
                      teacher_logit_scale: Scalar) -> Tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``DistillClipLoss`` (world size 1), fused: ``(contrastive_loss, distill_loss)``.

    With the student's logits ``X = s A B^T`` and the teacher's ``T = t A_t B_t^T`` (N x N, neither
    materialised)::

        contrastive_loss = clip_loss(A, B, s)
        distill_loss = (CE(softmax_rows(T), X) + CE(softmax_rows(T^T), X^T)) / 2,
        CE(P, X) = -mean_i sum_j P_ij log_softmax(X_i)_j = mean_i [logsumexp_j X_ij - sum_j P_ij X_ij]

    ``sum_j P_ij X_ij = s <a_i, (P B)_i>``: one teacher sweep contracts the teacher's softmaxes with the
    student's features, O((N + M) D) memory. Cost in N x N x D GEMMs: 1 (student log-sum-exps, shared by
    both losses) + 1 (teacher's) + 3 (teacher softmaxes times student features) forward, 3 backward (one
    gradient sweep serves both losses); open_clip: 4 + 4, with eight N x N matrices.

    Args:
        image_features, text_features: (N, D) student features (float, need not be normalised).
        logit_scale: the student's, exponentiated (0-d, [1] or float).
        teacher_image_features, teacher_text_features: (N, D_t) the teacher's (any width D_t); they must
            not require grad (the teacher is frozen) and are cast to the student's dtype.
        teacher_logit_scale: the teacher's, exponentiated; must not require grad.

    Returns:
        ``(contrastive_loss, distill_loss)``, 0-d float32 (float64 for float64); gradients reach the
        student's features and ``logit_scale``.
    """
    check_feature_pair(image_features, text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"the symmetric distillation loss needs as many images as texts, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")
    return _distill(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                    teacher_logit_scale, 0, True)


def distill_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, logit_scale: Scalar,
                          teacher_queries: torch.Tensor, teacher_keys: torch.Tensor, teacher_logit_scale: Scalar,
                          *, label_offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One direction of :func:`clip_distill_loss` over a rectangular block (open_clip's local loss):
    ``(contrastive_cross_entropy(queries, keys, s, label_offset=...), CE(softmax_rows(T), X))``.

    Args: queries (n, D), keys (M, D) with ``label_offset + n <= M``; the teacher's (n, D_t) and (M, D_t).
    """
    check_feature_pair(queries, keys, "queries", "keys")
    label_offset = as_int(label_offset, "label_offset")
    if label_offset < 0 or label_offset + queries.shape[0] > keys.shape[0]:
        raise ValueError(f"label_offset={label_offset!r} with {queries.shape[0]} queries needs "
                         f"0 <= label_offset <= {keys.shape[0] - queries.shape[0]} for {keys.shape[0]} keys")
    return _distill(queries, keys, logit_scale, teacher_queries, teacher_keys, teacher_logit_scale, label_offset, False)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scalar,
                logit_bias: Scalar, *, label_offset: int = 0, negative_only: bool = False,
                labels: Optional[torch.Tensor] = None, group_ids: Optional[GroupIds] = None) -> torch.Tensor:
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
        labels, group_ids: other positive pairs, as in :func:`contrastive_cross_entropy` (``z_ij = +1`` on
            each; rows may have none): ``labels`` (N,) a positive column per row, ``group_ids`` one (N,)
            tensor (N == M) or ``(image_ids (N,), text_ids (M,))``.

    Returns:
        0-d float32 (float64 for float64 inputs); gradients for both features, ``logit_scale``
        and ``logit_bias``. Raises and numerics as :func:`clip_loss`.
    """
    check_feature_pair(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if logit_bias is None:
        raise ValueError("siglip_loss needs logit_bias (SigLIP learns one; open_clip passes model.logit_bias)")
    label_offset = as_int(label_offset, "label_offset")
    ids = positive_ids(image_features, text_features, labels, group_ids)
    if ids is not None and (label_offset or negative_only):
        raise ValueError("labels / group_ids describe the positives: not with label_offset or negative_only")
    if ids is None and not negative_only and (label_offset < 0 or label_offset + n > m):
        raise ValueError(f"label_offset={label_offset!r} with {n} images needs 0 <= label_offset <= {m - n} "
                         f"for {m} texts (N != M needs negative_only=True or a label_offset)")
    scale = as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias = as_scalar_tensor(logit_bias, "logit_bias", image_features)
    image_features, text_features = _autocast_features(image_features, text_features)
    row_ids, col_ids = ids if ids is not None else (None, None)
    return _ops.siglip_loss(image_features, text_features, scale, bias, int(label_offset), bool(negative_only),
                            row_ids, col_ids)


def check_medoid_iterations(max_iters, split_size) -> Tuple[int, Optional[int]]:
    """``(max_iters, split_size)`` as ints (integer-like values accepted); ValueError unless ``max_iters``
    is an int >= 0 and ``split_size`` None or an int >= 1."""
    iters = int_in_range(max_iters, 0)
    if iters is None:
        raise ValueError(f"max_iters must be an int >= 0, got {max_iters!r}")
    if split_size is None:
        return iters, None
    split = int_in_range(split_size, 1)
    if split is None:
        raise ValueError(f"split_size must be None or an int >= 1, got {split_size!r}")
    return iters, split


def token_medoids(x: torch.Tensor, num_medoids: int, *, metric: str = "euclidean", max_iters: int = 100,
                  split_size: Optional[int] = None):
    """Deterministic k-medoids of each row's tokens, keeping the medoid tokens (CenterCLIP).

    Per row of ``x`` (N tokens): KKZ initialisation (the largest-norm token, then repeatedly the token
    farthest from its nearest chosen medoid), then alternating assignment (nearest medoid) and update
    (each cluster's member with the least total distance to its members) until the medoids stop
    changing or ``max_iters``; ties always go to the lowest index. Distances: ``"euclidean"``
    ``||x_i - x_j||`` (computed on row-mean-centred tokens: no cancellation for large norms) or
    ``"cosine"`` ``1 - cos(x_i, x_j)``. Exact semantics: :mod:`clipfast.reference.token_medoids`.

    Args:
        x: (R, N, D) float; R independent rows (e.g. a video segment's patch tokens each).
        num_medoids: K, 1 <= K <= N.
        split_size: None (every row stops on its own) or s > 0: rows in consecutive chunks of s iterate
            until no row of the chunk changes, CenterCLIP's chunked loop. Both give the same result: a
            row stops only when a step leaves its medoids unchanged, a fixed point that the extra steps
            of its chunk cannot move (the reference runs the chunk loop literally; the tests check it).

    Returns:
        ``(medoids (R, K, D), medoid_index (R, K) int64 strictly ascending (K distinct tokens, also when
        fewer than K tokens differ: a chosen token is never chosen again and a medoid belongs to its own
        cluster), assignment (R, N) int64)``; the assignment indexes the sorted medoids. ``medoids`` is gathered from ``x``, so gradients flow to
        the chosen tokens; the indices are not differentiable.

    Raises:
        TypeError: non-tensor or non-float x. ValueError: x not 3-D, K outside [1, N], unknown metric,
        negative max_iters, split_size < 1; NaN or Inf in x (indices cannot carry a NaN: by the
        non-finite rule of :data:`clipfast.inputs.NON_FINITE_RULE`, a ValueError on CPU, a device assert on CUDA).
        Integer arguments accept any integer-like value (NumPy integers, 0-d integer tensors).
    """
    check_float_tensor(x, "x", ("rows", "tokens", "dim"))
    k = int_in_range(num_medoids, 1, x.shape[1])
    if k is None:
        raise ValueError(f"num_medoids must be an int in [1, {x.shape[1]}] (the tokens per row), got {num_medoids!r}")
    num_medoids = k
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    max_iters, split_size = check_medoid_iterations(max_iters, split_size)
    from clipfast.ops import token_keep as _keep_ops
    from clipfast.ops import token_medoids as _medoid_ops

    index, assignment = _medoid_ops.token_medoids_index(x.detach(), num_medoids, metric, max_iters, split_size or 0)
    # The medoid tokens are kept tokens: rows at ascending distinct indices, gathered (with the scatter-free
    # backward) by the op attentive_token_keep uses.
    medoids = _keep_ops.token_keep_gather(x, index, None, 0)
    return medoids, index, assignment


def segment_medoids(tokens: torch.Tensor, num_frames: int, num_segments: int, num_medoids: int, *,
                    num_prefix_tokens: int = 1, metric: str = "euclidean", max_iters: int = 100,
                    split_size: Optional[int] = None) -> torch.Tensor:
    """CenterCLIP's token clustering step for video frames folded into the batch.

    ``tokens: (B*T, P + L, D)`` (frame-major: rows ``b*T .. b*T + T - 1`` are video b's frames; P prefix
    tokens such as [CLS], then L patch tokens). Frames are grouped into ``num_segments`` segments of
    ``T / num_segments`` consecutive frames; each segment's ``(T/S) * L`` patch tokens are clustered
    with :func:`token_medoids` and the K medoid tokens are kept in their original spatio-temporal
    order; the prefix tokens are averaged over the segment's frames.

    Returns:
        ``(B * num_segments, P + K, D)``, video-major (row ``b * S + s``). Differentiable through the
        kept tokens and the prefix mean.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be a (batch*frames, prefix+patches, dim) tensor, got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    num_frames, num_segments = as_int(num_frames, "num_frames"), as_int(num_segments, "num_segments")
    num_prefix_tokens = as_int(num_prefix_tokens, "num_prefix_tokens")
    if num_frames < 1 or tokens.shape[0] % num_frames:
        raise ValueError(f"{tokens.shape[0]} rows are not a whole number of videos of num_frames={num_frames}")
    if num_segments < 1 or num_frames % num_segments:
        raise ValueError(f"num_frames={num_frames} is not divisible into num_segments={num_segments} segments")
    if not 0 <= num_prefix_tokens < tokens.shape[1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must leave patch tokens (row length {tokens.shape[1]})")
    videos, per_segment = tokens.shape[0] // num_frames, num_frames // num_segments
    d = tokens.shape[-1]
    grouped = tokens.reshape(videos * num_segments, per_segment, tokens.shape[1], d)
    prefix = grouped[:, :, :num_prefix_tokens].mean(dim=1)
    patches = grouped[:, :, num_prefix_tokens:].reshape(videos * num_segments, -1, d)
    medoids, _, _ = token_medoids(patches, num_medoids, metric=metric, max_iters=max_iters, split_size=split_size)
    return torch.cat([prefix, medoids], dim=1)


def _check_sizes(size: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(size, torch.Tensor) or size.shape != x.shape[:2] or size.dtype not in FLOAT_DTYPES:
        raise ValueError(f"size must be a float tensor of shape {tuple(x.shape[:2])} (batch, tokens), got "
                         f"{getattr(size, 'dtype', type(size).__name__)} {tuple(getattr(size, 'shape', ()))}")
    if size.device != x.device:
        raise ValueError(f"size is on {size.device} but x on {x.device}")
    check_no_nan(size, "size")
    if size.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool((size <= 0).any()):
            raise ValueError("size must be positive (a token's size counts the patches it stands for)")
    else:
        torch._assert_async((size > 0).all(), "clipfast: size must be positive")


def token_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, size: Optional[torch.Tensor] = None,
                num_prefix_tokens: int = 1):
    """Token merging (ToMe, Bolya et al., ICLR 2023): bipartite soft matching on ``metric``, then the
    size-weighted merge of ``x``.

    The tokens split alternately into A (positions 0, 2, ...) and B (1, 3, ...); every A token's partner is
    its most similar B token by cosine of the metric; the ``r'`` A tokens with the most similar partners
    are merged into them, with ``r' = max(0, min(r, (N - P) // 2))`` (ToMe's cap) and the P prefix tokens
    never merged nor merged into. Each output token is the size-weighted mean of the tokens merged into it::

        merged[o] = sum_{i -> o} size_i x_i / merged_size[o],      merged_size[o] = sum_{i -> o} size_i

    in ToMe's output order (prefix tokens, kept A tokens, B tokens). Ties go to the lower index. Exact
    semantics: :mod:`clipfast.reference.token_merge` (ToMe's ``bipartite_soft_matching`` + ``merge_wavg``
    for P <= 2).

    Args:
        x: (B, N, D) float tokens; differentiable.
        metric: (B, N, C) float matching features (ToMe: the attention keys averaged over heads); not
            differentiated.
        r: tokens to merge away (int >= 0).
        size: None (every token one patch) or (B, N) positive float sizes from an earlier merge; not
            differentiated.
        num_prefix_tokens: P protected tokens at the front ([CLS], a distillation token, registers).

    Returns:
        ``(merged (B, N - r', D) in x's dtype, merged_size (B, N - r') float32 (float64 for float64 x),
        dest (B, N) int64)``. ``dest[b, i]`` is token i's output row, so ToMe's unmerge is
        ``merged.gather(1, dest[..., None].expand(-1, -1, D))`` and sources trace by composing the dests.
        The backward is a gather: ``grad_x[i] = size_i / merged_size[dest_i] * grad_merged[dest_i]``.

    Raises:
        TypeError: non-tensor or non-float x / metric. ValueError: not 3-D, mismatched batch or token
        counts or devices, r < 0, num_prefix_tokens outside [0, N], a size of the wrong shape, not positive;
        NaN or Inf in the metric or the sizes (:data:`clipfast.inputs.NON_FINITE_RULE`). Integer arguments
        accept any integer-like value.
    """
    from clipfast.ops import token_merge as _merge_ops
    from clipfast.reference.token_merge import merge_count

    check_float_tensor(x, "x", ("batch", "tokens", "dim"))
    check_float_tensor(metric, "metric", ("batch", "tokens", "channels"))
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric {tuple(metric.shape)} and x {tuple(x.shape)} must have the same batch and tokens")
    if metric.device != x.device:
        raise ValueError(f"metric is on {metric.device} but x on {x.device}")
    tokens = x.shape[1]
    merge = int_in_range(r, 0)
    if merge is None:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    num_prefix = int_in_range(num_prefix_tokens, 0, tokens)
    if num_prefix is None:
        raise ValueError(f"num_prefix_tokens must be an int in [0, {tokens}], got {num_prefix_tokens!r}")
    if size is not None:
        _check_sizes(size, x)
        size = size.detach().to(compute_dtype(x.dtype))
    dest = _merge_ops.token_merge_match(metric.detach(), merge, num_prefix)
    merged, merged_size = _merge_ops.token_merge_reduce(x, dest, size, tokens - merge_count(tokens, merge, num_prefix))
    return merged, merged_size, dest


def num_keep_for_ratio(num_patches: int, keep_ratio: float, *, block: int = 1) -> int:
    """The number of patches :func:`attentive_token_keep` keeps for a keep ratio, by the anchors' rules.

    - ``block == 1`` (EViT): ``ceil(keep_ratio * num_patches)``, at least 1.
    - ``block = b > 1`` (A-CLIP): of the ``n_b = num_patches / b^2`` blocks keep ``min(n_b, int(n_b *
      keep_ratio) + 1)``, i.e. ``num_keep`` = that times ``b^2`` patches. A-CLIP's ratio 0.5 on a 14 x 14
      grid keeps int(49 * 0.5) + 1 = 25 of 49 2 x 2 blocks: 100 of 196 patches.
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    num_patches, block = as_int(num_patches, "num_patches"), as_int(block, "block")
    if block == 1:
        return max(1, math.ceil(keep_ratio * num_patches))
    blocks = num_patches // (block * block)
    return min(blocks, int(blocks * keep_ratio) + 1) * block * block


def is_keep_ratio(num_keep) -> bool:
    """A keep ratio (a non-integer real such as 0.5 or 1.0) rather than a patch count."""
    return isinstance(num_keep, numbers.Real) and not isinstance(num_keep, bool) and not is_int_like(num_keep)


def resolve_num_keep(patches: int, num_keep, grid: Optional[tuple], block) -> int:
    """The patch count :func:`attentive_token_keep` keeps of ``patches`` per row, from the shapes only
    (the patches use it at patch time); ValueError naming what does not fit."""
    if int_in_range(block, 1) is None:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    block = operator.index(block)
    if grid is not None:
        sides = [int_in_range(g, 1) for g in grid] if len(grid) == 2 else [None]
        if None in sides or sides[0] * sides[1] != patches:
            raise ValueError(f"grid must be (rows, cols) of positive ints with rows * cols = {patches} patches, "
                             f"got {grid!r}")
        if sides[0] % block or sides[1] % block:
            raise ValueError(f"grid {tuple(grid)} is not divisible into {block} x {block} blocks")
    elif block > 1:
        raise ValueError(f"block={block} needs grid=(rows, cols), the patch grid the blocks are cut from")
    if is_keep_ratio(num_keep):
        num_keep = num_keep_for_ratio(patches, num_keep, block=block)
    kept = int_in_range(num_keep, 1, patches)
    if kept is None:
        raise ValueError(f"num_keep must be an int in [1, {patches}] (the patches per row) or a ratio in (0, 1], "
                         f"got {num_keep!r}")
    num_keep = kept
    if num_keep % (block * block):
        raise ValueError(f"in block mode num_keep counts patches and must be a multiple of block * block = "
                         f"{block * block}, got {num_keep}")
    return num_keep


def _check_keep_arguments(tokens, scores, num_keep, num_prefix_tokens, grid, block) -> int:
    check_float_tensor(tokens, "tokens", ("batch", "tokens", "dim"))
    check_float_tensor(scores, "scores", ("batch", "patches"))
    prefix = int_in_range(num_prefix_tokens, 0, tokens.shape[1] - 1)
    if prefix is None:
        raise ValueError(f"num_prefix_tokens must be an int in [0, {tokens.shape[1]}) for {tokens.shape[1]} tokens, "
                         f"got {num_prefix_tokens!r}")
    patches = tokens.shape[1] - prefix
    if scores.shape != (tokens.shape[0], patches):
        raise ValueError(f"scores must have shape (batch, patches) = ({tokens.shape[0]}, {patches}) for tokens of "
                         f"shape {tuple(tokens.shape)} with {num_prefix_tokens} prefix tokens, got {tuple(scores.shape)}")
    if scores.device != tokens.device:
        raise ValueError(f"scores are on {scores.device} but tokens on {tokens.device}")
    return resolve_num_keep(patches, num_keep, grid, block)


def attentive_token_keep(tokens: torch.Tensor, scores: torch.Tensor, num_keep: Union[int, float], *,
                         num_prefix_tokens: int = 1, grid: Optional[tuple] = None, block: int = 1,
                         fuse_dropped: bool = False):
    """Keep the prefix tokens and the highest-scoring patch tokens, in their original order (A-CLIP, EViT).

    With ``x = tokens[b]``, ``P = num_prefix_tokens`` and ``s = scores[b]``::

        keep_index[b] = sorted(top-K of s)                       (ties to the lower index)
        kept[b]       = [x[:P], x[P + keep_index[b]] (, sum_{i dropped} s_i * x[P + i])]

    ``block = b > 1`` is A-CLIP's selection: the patch grid ``grid = (rows, cols)`` is cut into b x b blocks,
    blocks are ranked by the mean of their scores and the best ``K / b^2`` keep all their patches.
    ``fuse_dropped=True`` appends EViT's fused token, the dropped tokens weighted by their scores as given
    (not renormalised). Exact semantics: :mod:`clipfast.reference.token_keep`.

    Args:
        tokens: (B, P + L, D) float. scores: (B, L) float (e.g. :func:`clipfast.cls_attention_scores`);
            compared in float32 (float64 for float64 tokens).
        num_keep: K patches to keep, an int in [1, L] (a multiple of b^2 in block mode), or a keep ratio
            in (0, 1] turned into K by :func:`num_keep_for_ratio`.

    Returns:
        ``(kept (B, P + K (+1 with fuse_dropped), D), keep_index (B, K) int64 ascending)``. Gradients
        reach the kept tokens (a row scatter in the backward) and, with ``fuse_dropped``, the dropped
        tokens and the scores through the fused token; the selection itself is not differentiable.

    Raises:
        TypeError: non-tensor or non-float tokens / scores. ValueError: wrong shapes, scores that do not
        match the patches, num_keep out of range, a grid that does not match L or the block size; NaN in
        ``scores`` (a selection cannot carry it: :data:`clipfast.inputs.NON_FINITE_RULE`; +-inf scores are ordered values,
        NaN in ``tokens`` propagates into ``kept``). Integer arguments accept integer-like values.
    """
    num_keep = _check_keep_arguments(tokens, scores, num_keep, num_prefix_tokens, grid, block)
    num_prefix_tokens, block = operator.index(num_prefix_tokens), operator.index(block)
    grid = None if grid is None else (operator.index(grid[0]), operator.index(grid[1]))
    check_no_nan(scores.detach(), "scores", allow_inf=True)
    from clipfast.ops import token_keep as _keep_ops

    rank_scores = scores.detach().to(compute_dtype(tokens.dtype))
    keep_index = _keep_ops.token_keep_index(rank_scores, num_keep, grid[1] if grid is not None else 0, block)
    weights = scores.to(compute_dtype(tokens.dtype)).contiguous() if fuse_dropped else None
    kept = _keep_ops.token_keep_gather(tokens, keep_index, weights, num_prefix_tokens)
    return kept, keep_index
