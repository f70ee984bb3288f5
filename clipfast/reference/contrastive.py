"""Reference (specification) of the contrastive losses, in plain PyTorch.

Notation: image features ``A: (N, D)``, text features ``B: (M, D)``, scale ``s`` (already
exponentiated, as open_clip passes it), bias ``beta``; logits ``X = s * A @ B.T + beta`` of shape
``(N, M)``. These functions materialise ``X``: they are the readable definition every backend is
tested against (in float64), and the fallback kernels of the ``reference`` backend.

Losses (labels ``y_i = label_offset + i``):

- InfoNCE rows:  ``L_row = mean_i CE(X_i, y_i)``, with ``CE`` = ``torch.nn.functional.cross_entropy``
  (including its ``label_smoothing``).
- CLIP (symmetric, N == M, offset 0): ``L = (L_row + L_col) / 2``, ``L_col = mean_j CE(X[:, j], j)``.
- SigLIP: ``L = -sum_ij logsigmoid(z_ij * X_ij) / N`` with ``z_ij = +1`` on positive pairs
  ``(i, y_i)`` and ``-1`` elsewhere (all ``-1`` for a negatives-only block).
- Multi-positive (``row_ids``, ``col_ids``): every pair of equal ids is positive; InfoNCE's targets are
  uniform over a row's positives (UniCL), SigLIP's ``z`` is +1 on each.
- Distillation (open_clip's ``DistillClipLoss``): the student's InfoNCE and the cross-entropy between the
  teacher's softmax and the student's, both directions.

The kernel-level functions at the bottom (``*_reference``) have the same contract as the native and
Triton kernels used by :mod:`clipfast.ops.contrastive`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from clipfast.dtypes import compute_dtype


def _logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: Optional[torch.Tensor]) -> torch.Tensor:
    logits = logit_scale.reshape(()) * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias.reshape(())
    return logits


def clip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: Optional[torch.Tensor] = None, *, label_smoothing: float = 0.0,
                        label_offset: int = 0, symmetric: bool = True) -> torch.Tensor:
    """CLIP's InfoNCE. ``symmetric=True``: mean of image->text and text->image cross-entropies with
    labels ``arange(N)`` (N == M). ``symmetric=False``: the rows direction only, labels
    ``label_offset + arange(N)`` into the M columns."""
    logits = _logits(image, text, logit_scale, logit_bias)
    labels = torch.arange(image.shape[0], device=image.device) + label_offset
    row = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if not symmetric:
        return row
    col = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    return (row + col) / 2


def siglip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                          logit_bias: torch.Tensor, *, label_offset: int = 0,
                          negative_only: bool = False) -> torch.Tensor:
    """SigLIP's sigmoid loss over all pairs, divided by the number of image rows N."""
    logits = _logits(image, text, logit_scale, logit_bias)
    n, m = logits.shape
    signs = -torch.ones(n, m, dtype=logits.dtype, device=logits.device)
    if not negative_only:
        rows = torch.arange(n, device=logits.device)
        signs[rows, rows + label_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


def multi_positive_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                                  row_ids: torch.Tensor, col_ids: torch.Tensor, logit_bias: Optional[torch.Tensor] = None,
                                  *, symmetric: bool = True, label_smoothing: float = 0.0) -> torch.Tensor:
    """InfoNCE with every pair of equal ids positive (UniCL; :data:`clipfast.functional.MULTI_POSITIVE`): each
    row's target is uniform over its positive columns (each column's over its positive rows), through
    ``F.cross_entropy`` with probability targets. ``labels`` are ``row_ids = labels, col_ids = arange(M)``."""
    logits = _logits(image, text, logit_scale, logit_bias)
    positive = (row_ids[:, None] == col_ids[None, :]).to(logits.dtype)
    row = F.cross_entropy(logits, positive / positive.sum(1, keepdim=True), label_smoothing=label_smoothing)
    if not symmetric:
        return row
    col = F.cross_entropy(logits.T, positive.T / positive.T.sum(1, keepdim=True), label_smoothing=label_smoothing)
    return (row + col) / 2


def multi_positive_siglip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                                         logit_bias: torch.Tensor, row_ids: torch.Tensor,
                                         col_ids: torch.Tensor) -> torch.Tensor:
    """SigLIP with ``z_ij = +1`` on every pair of equal ids, -1 elsewhere, divided by N."""
    logits = _logits(image, text, logit_scale, logit_bias)
    signs = torch.where(row_ids[:, None] == col_ids[None, :], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def distill_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           teacher_image: torch.Tensor, teacher_text: torch.Tensor, teacher_scale: torch.Tensor,
                           *, label_offset: int = 0, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``DistillClipLoss``: ``(contrastive, distill)`` with
    ``distill = (CE(softmax(T), X) + CE(softmax(T.T), X.T)) / 2`` (rows only when not symmetric),
    ``CE(P, X) = -(P * log_softmax(X)).sum(1).mean()``, X the student's logits and T the teacher's."""
    student = _logits(image, text, logit_scale, None)
    teacher = _logits(teacher_image, teacher_text, teacher_scale, None)

    def cross_entropy(teacher_logits, student_logits):
        return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()

    contrastive = clip_loss_reference(image, text, logit_scale, label_offset=label_offset, symmetric=symmetric)
    if not symmetric:
        return contrastive, cross_entropy(teacher, student)
    return contrastive, (cross_entropy(teacher, student) + cross_entropy(teacher.T, student.T)) / 2


# ---------------------------------------------------------------------------------------------------
# Kernel contract (shared with csrc/cpu/contrastive.cpp, csrc/cuda/contrastive.cu and
# triton_kernels/contrastive.py). x: (N, D), y: (M, D), S = scale * x @ y.T; outputs in the
# computation dtype (float64 for float64 inputs, float32 otherwise).
# ---------------------------------------------------------------------------------------------------

def _scores(x, y, scale):
    dtype = compute_dtype(x.dtype)
    return scale.reshape(()).to(dtype) * (x.to(dtype) @ y.to(dtype).T), dtype


def contrastive_lse_reference(x, y, scale, with_cols: bool):
    """``row_lse = logsumexp(S, 1)``: (N,); ``col_lse = logsumexp(S, 0)``: (M,) or empty (0,)."""
    s, dtype = _scores(x, y, scale)
    col = torch.logsumexp(s, 0) if with_cols else s.new_empty(0)
    return torch.logsumexp(s, 1), col


def contrastive_grad_reference(x, y, scale, row_lse, col_lse, row_weight: float, col_weight: float,
                               x_values=None, y_values=None):
    """``G = row_weight * exp(S - row_lse[:, None]) + col_weight * exp(S - col_lse[None, :])`` (the
    column term only when ``col_lse`` is non-empty and ``col_weight != 0``); returns
    ``(G @ y_values, G.T @ x_values)``, the values ``(N, E)`` and ``(M, E)`` defaulting to ``x`` and ``y``
    (distillation contracts a teacher's G with the student's features)."""
    s, dtype = _scores(x, y, scale)
    g = row_weight * torch.exp(s - row_lse.to(dtype)[:, None])
    if col_lse.numel() > 0 and col_weight != 0.0:
        g = g + col_weight * torch.exp(s - col_lse.to(dtype)[None, :])
    x_values, y_values = (x, y) if x_values is None else (x_values, y_values)
    return g @ y_values.to(dtype), g.T @ x_values.to(dtype)


def siglip_softplus_reference(x, y, scale, bias):
    """``row_sum = softplus(S + bias).sum(1)``: (N,)."""
    s, dtype = _scores(x, y, scale)
    return F.softplus(s + bias.reshape(()).to(dtype)).sum(1)


def siglip_grad_reference(x, y, scale, bias):
    """``G = sigmoid(S + bias)``; returns ``(G @ y, G.T @ x, G.sum(1))``."""
    s, dtype = _scores(x, y, scale)
    g = torch.sigmoid(s + bias.reshape(()).to(dtype))
    return g @ y.to(dtype), g.T @ x.to(dtype), g.sum(1)
