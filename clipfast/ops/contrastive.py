"""Registration of the fused contrastive losses as PyTorch custom ops, with fakes and autograd.

Ops (all ``mutates_args=()``, shapes of every output known from input shapes alone):

- ``clipfast::contrastive_loss(image, text, logit_scale, logit_bias, label_offset, symmetric,
  label_smoothing, row_ids=None, col_ids=None) -> (loss, row_lse, col_lse)``: InfoNCE. ``loss`` is a
  0-d tensor, ``row_lse`` ``(N,)`` and ``col_lse`` ``(M,)`` (``(0,)`` when not symmetric) are the
  log-sum-exps of the unbiased logits ``S = s * A @ B.T`` that backward needs. ``logit_bias`` is
  accepted and ignored: softmax is shift-invariant, so the loss does not depend on it and its gradient
  is exactly zero. ``row_ids`` (N,) / ``col_ids`` (M,) int64, when given, replace the diagonal
  ``(i, label_offset + i)``: pair (i, j) is positive when the ids are equal, targets uniform over a
  row's positives (:data:`clipfast.functional.MULTI_POSITIVE`; labels are ``(labels, arange(M))``).
- ``clipfast::contrastive_loss_backward(...) -> (grad_image, grad_text, grad_logit_scale)``.
- ``clipfast::siglip_loss(image, text, logit_scale, logit_bias, label_offset, negative_only,
  row_ids=None, col_ids=None) -> loss`` (ids: ``z = +1`` on every pair of equal ids).
- ``clipfast::siglip_loss_backward(...) -> (grad_image, grad_text, grad_logit_scale, grad_logit_bias)``.
- ``clipfast::distill_loss(image, text, logit_scale, teacher_image, teacher_text, teacher_scale,
  label_offset, symmetric) -> (contrastive, distill, row_lse, col_lse, row_target, col_target)``:
  open_clip's DistillClipLoss; ``row_target = G_T @ B`` (N, D) and ``col_target = G_T.T @ A`` (M, D) are
  the teacher's softmaxes (``G_T = w_r P_T + w_c Q_T``) contracted with the student's features.
- ``clipfast::distill_loss_backward(grad_contrastive, grad_distill, ...) -> (grad_image, grad_text,
  grad_logit_scale)``: the teacher is frozen (no gradient).

Each op body does the O(N*M*D) work through the selected backend's kernels (see
:mod:`clipfast.backends`) and the O((N+M)*D) rest here, once for every backend:

InfoNCE. With ``r = row_lse``, ``c = col_lse``, label smoothing ``eps``, positives
``p_i = s <a_i, b_{o+i}>`` (``o`` = label_offset) and ``T = s <sum_i a_i, sum_j b_j>`` (the sum of all
logits), the row loss is ``sum_i (r_i - (1-eps) p_i) / N - eps T / (N M)`` and the column loss
``sum_j (c_j - (1-eps) p_j) / M - eps T / (N M)``. Its gradient w.r.t. the logits is
``G = w_r (P - (1-eps) I_o - eps/M) + w_c (Q - (1-eps) I - eps/N)`` with row/column softmaxes P, Q
and weights ``w_r = 1/N`` (1/(2N) when symmetric), ``w_c = 1/(2M)`` (0 otherwise). The kernels
return ``Abar = (w_r P + w_c Q) @ B`` and ``Bbar = (w_r P + w_c Q).T @ A``; the label and smoothing
terms are subtracted here in the computation dtype after accumulation (never folded into the tile
as ``P_ii - 1``, which cancels in low precision); then ``dA = g s Abar``, ``dB = g s Bbar``,
``ds = g sum_i <a_i, Abar_i>``.

Labels as groups (``row_ids``, ``col_ids``): with ``|P_g|`` / ``|Q_g|`` the columns / rows of group g and
``A_g``, ``B_g`` their feature sums, the positive terms are ``s sum_g <A_g, B_g> / |P_g|`` (rows) and
``/ |Q_g|`` (columns), and the label part of G subtracts ``(1-eps)(w_r / |P_g| + w_c / |Q_g|) B_g`` from
each row of group g in ``Abar`` (``A_g`` from each column in ``Bbar``): O((N + M) D), same kernels.

Distillation. ``distill = w_r sum_i r_i + w_c sum_j c_j - s <A, G_T @ B>`` with the teacher's
``G_T`` from its own log-sum-exps (one more LSE sweep and one gradient-kernel sweep whose products use
the student's features as values); the student's G for both losses together is
``(g_c + g_d)(w_r P + w_c Q) - g_c (w_r + w_c) I_o - g_d G_T``: one gradient sweep for both.

SigLIP. ``loss = (sum_ij softplus(x_ij) - [positives] sum_i x_{i,o+i}) / N`` with
``x = s A B.T + beta``; ``G = (sigmoid(X) - I_o) / N``; the kernels return ``sigmoid(X) @ B``,
``sigmoid(X).T @ A`` and the row sums of ``sigmoid(X)`` (for ``d beta``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from clipfast import backends
from clipfast.dtypes import compute_dtype
from clipfast.reference import contrastive as reference

class ContrastiveKernels(NamedTuple):
    """The four N x M kernels every backend provides; contract: :mod:`clipfast.reference.contrastive`."""
    lse: Callable  # (x, y, scale, with_cols) -> (row_lse (N,), col_lse (M,) or (0,))
    # (x, y, scale, row_lse, col_lse, row_weight, col_weight, x_values=None, y_values=None)
    #   -> (G @ y_values, G.T @ x_values); the values (N, E), (M, E) default to x and y
    grad: Callable
    softplus: Callable  # (x, y, scale, bias) -> row sums of softplus(scale x y^T + bias), (N,)
    siglip_grad: Callable  # (x, y, scale, bias) -> (sigmoid(X) @ y, sigmoid(X).T @ x, row sums of sigmoid(X))


def _triton_kernels() -> ContrastiveKernels:
    from clipfast.triton_kernels import contrastive as triton

    return ContrastiveKernels(triton.contrastive_lse_triton, triton.contrastive_grad_triton,
                              triton.siglip_softplus_triton, triton.siglip_grad_triton)


def _out(x, *shape):
    return x.new_empty(shape, dtype=compute_dtype(x.dtype))


KERNELS = backends.OpKernels(
    "contrastive",
    reference=ContrastiveKernels(reference.contrastive_lse_reference, reference.contrastive_grad_reference,
                                 reference.siglip_softplus_reference, reference.siglip_grad_reference),
    native=ContrastiveKernels("contrastive_lse", "contrastive_grad", "siglip_softplus", "siglip_grad"),
    triton=_triton_kernels,
    native_fakes=ContrastiveKernels(
        lse=lambda x, y, scale, with_cols: (_out(x, x.shape[0]), _out(x, y.shape[0] if with_cols else 0)),
        grad=lambda x, y, scale, row_lse, col_lse, row_weight, col_weight, x_values=None, y_values=None: (
            _out(x, x.shape[0], (y if y_values is None else y_values).shape[1]),
            _out(x, y.shape[0], (y if y_values is None else y_values).shape[1])),
        softplus=lambda x, y, scale, bias: _out(x, x.shape[0]),
        siglip_grad=lambda x, y, scale, bias: (_out(x, *x.shape), _out(x, *y.shape), _out(x, x.shape[0]))),
)


def _check_scalar_values(logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor]) -> None:
    """Value checks the Python layer cannot do without a host sync: on the CPU they raise ValueError,
    on a GPU they become asynchronous device asserts (no sync; a failure surfaces at the next sync)."""
    if logit_scale.device.type == "cpu":
        value = float(logit_scale.detach().reshape(()))
        if not (value >= 0.0 and value != float("inf")):
            raise ValueError(f"logit_scale must be finite and >= 0 (it is already exponentiated), got {value}")
        if logit_bias is not None and not torch.isfinite(logit_bias).all():
            raise ValueError(f"logit_bias must be finite, got {float(logit_bias.detach().reshape(()))}")
    else:
        torch._assert_async(torch.isfinite(logit_scale).all() & (logit_scale >= 0).all(),
                            "clipfast: logit_scale must be finite and >= 0")
        if logit_bias is not None:
            torch._assert_async(torch.isfinite(logit_bias).all(), "clipfast: logit_bias must be finite")


# ---------------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------------

def _infonce_weights(n: int, m: int, symmetric: bool) -> tuple[float, float]:
    return (0.5 / n, 0.5 / m) if symmetric else (1.0 / n, 0.0)


# The O((N + M) * D) epilogues around the kernels, shared by the ops below and by the ring loss of
# clipfast.distributed (which merges the kernels' block results across ranks first): one copy of the math.

def positive_logit_sum(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                       label_offset: int) -> torch.Tensor:
    """``s * sum_i <q_i, k_{o+i}>``, the sum of the positive logits, in the computation dtype."""
    dtype = compute_dtype(queries.dtype)
    n = queries.shape[0]
    return logit_scale.reshape(()).to(dtype) * (queries.to(dtype) * keys[label_offset:label_offset + n].to(dtype)).sum()


def infonce_from_lse(lse: torch.Tensor, positives: torch.Tensor, label_smoothing: float, smooth) -> torch.Tensor:
    """One direction's InfoNCE from its log-sum-exps: ``(sum lse - (1 - eps) * positives) / len(lse) - smooth``
    (``smooth`` = ``eps * T / (N M)``, the uniform part of the smoothed labels, or 0)."""
    return (lse.sum() - (1 - label_smoothing) * positives) / lse.shape[0] - smooth


def subtract_positive_pairs(query_bar: torch.Tensor, key_bar: torch.Tensor, queries: torch.Tensor,
                            keys: torch.Tensor, weight: float, label_offset: int) -> None:
    """The one-hot part of G after accumulation, in place: ``query_bar_i -= w k_{o+i}``, ``key_bar_{o+i} -= w q_i``
    (never folded into the tile as ``P_ii - 1``, which cancels in low precision)."""
    n = queries.shape[0]
    query_bar[:n].sub_(keys[label_offset:label_offset + n], alpha=weight)
    key_bar[label_offset:label_offset + n].sub_(queries, alpha=weight)


def logit_scale_gradient(grad_loss: torch.Tensor, logit_scale: torch.Tensor, *pairs) -> torch.Tensor:
    """``g * sum_(q, q_bar) <q, q_bar>`` (``dL/ds = sum_ij G_ij <q_i, k_j>``), in ``logit_scale``'s shape and dtype;
    ``pairs`` are (queries, G @ keys) in the computation dtype."""
    total = sum(torch.vdot(q.flatten(), q_bar.flatten()) for q, q_bar in pairs)
    return (grad_loss.to(total.dtype) * total).reshape(logit_scale.shape).to(logit_scale.dtype)


def feature_gradient(grad_loss: torch.Tensor, logit_scale: torch.Tensor, g_at: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """``g * s * (G @ keys)`` in the features' ``dtype`` (in place on the fp32 accumulator)."""
    return g_at.mul_(grad_loss.to(g_at.dtype) * logit_scale.reshape(()).to(g_at.dtype)).to(dtype)


class GroupSums(NamedTuple):
    """Multi-positive labels as groups: pair (i, j) is positive when ``row_ids[i] == col_ids[j]``. With the
    ids compacted to groups ``0..G-1`` every label term is O((N + M) D): the positives of row i are the
    ``col_count[g_i]`` columns of its group, whose feature sum is ``col_sum[g_i]``."""
    row_group: torch.Tensor  # (N,) group of each row
    col_group: torch.Tensor  # (M,) group of each column
    row_count: torch.Tensor  # (G,) rows per group, computation dtype
    col_count: torch.Tensor  # (G,) columns per group
    row_sum: torch.Tensor  # (G, D) sum of the rows' features per group, computation dtype
    col_sum: torch.Tensor  # (G, D) sum of the columns' features per group

    def pair_logit_sums(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """``(G,)``: per group, the sum of its positive logits ``s <row_sum_g, col_sum_g>``."""
        return logit_scale.reshape(()).to(self.row_sum.dtype) * (self.row_sum * self.col_sum).sum(1)


def group_sums(queries: torch.Tensor, keys: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor) -> GroupSums:
    """:class:`GroupSums` of ``queries`` (N, D) and ``keys`` (M, D) in the computation dtype (one sort of the
    N + M ids, two index_adds)."""
    dtype = compute_dtype(queries.dtype)
    ids, group = torch.unique(torch.cat([row_ids, col_ids]), return_inverse=True)
    row_group, col_group = group[:row_ids.shape[0]], group[row_ids.shape[0]:]
    groups = ids.shape[0]

    def sums(group_of, features):
        return features.new_zeros((groups, features.shape[1]), dtype=dtype).index_add_(0, group_of, features.to(dtype))

    return GroupSums(row_group, col_group, torch.bincount(row_group, minlength=groups).to(dtype),
                     torch.bincount(col_group, minlength=groups).to(dtype), sums(row_group, queries),
                     sums(col_group, keys))


def _reciprocal_or_zero(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0)


def _check_every_row_has_a_positive(groups: GroupSums, symmetric: bool) -> None:
    """InfoNCE needs a positive for every row (and every column when symmetric): a row whose id no
    column has would have an empty target distribution."""
    bad = (groups.col_count[groups.row_group] == 0).any()
    if symmetric:
        bad = bad | (groups.row_count[groups.col_group] == 0).any()
    message = "every row (and, for the symmetric loss, every column) needs a positive: an id no column (row) has"
    if groups.row_group.device.type == "cpu":
        if bool(bad):
            raise ValueError(f"clipfast: {message}")
    else:
        torch._assert_async(~bad, f"clipfast: {message}")


def group_positive_sums(groups: GroupSums, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE's positive terms with multi-positive targets, uniform over each row's (column's) positives:
    ``sum_i mean_{j in P(i)} S_ij`` for the rows and ``sum_j mean_{i in Q(j)} S_ij`` for the columns."""
    pairs = groups.pair_logit_sums(logit_scale)
    return (pairs * _reciprocal_or_zero(groups.col_count)).sum(), (pairs * _reciprocal_or_zero(groups.row_count)).sum()


def infonce_group_weights(groups: GroupSums, row_weight: float, col_weight: float) -> torch.Tensor:
    """``(G,)``: the weight of each positive pair of group g in InfoNCE's G, ``row_weight / |P_g| +
    col_weight / |Q_g|`` (``|P_g|``: the columns of group g, ``|Q_g|``: its rows; targets are uniform)."""
    return row_weight * _reciprocal_or_zero(groups.col_count) + col_weight * _reciprocal_or_zero(groups.row_count)


def subtract_group_pairs(query_bar: torch.Tensor, key_bar: torch.Tensor, groups: GroupSums,
                         weight: torch.Tensor) -> None:
    """The label part of G for group targets, in place, with ``weight`` (G,) per positive pair of each
    group: ``query_bar_i -= w_{g_i} col_sum_{g_i}`` and ``key_bar_j -= w_{g_j} row_sum_{g_j}``."""
    query_bar.sub_((weight[:, None] * groups.col_sum)[groups.row_group])
    key_bar.sub_((weight[:, None] * groups.row_sum)[groups.col_group])


def _infonce_positive_sums(a, b, logit_scale, label_offset, symmetric, row_ids, col_ids):
    """(row direction, column direction) sums of the positive logits: one positive per row at
    ``label_offset + i``, or the group targets of ``row_ids`` / ``col_ids``."""
    if row_ids is None:
        positives = positive_logit_sum(a, b, logit_scale, label_offset)
        return positives, positives
    groups = group_sums(a, b, row_ids, col_ids)
    _check_every_row_has_a_positive(groups, symmetric)
    return group_positive_sums(groups, logit_scale)


@torch.library.custom_op("clipfast::contrastive_loss", mutates_args=())
def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: Optional[torch.Tensor], label_offset: int, symmetric: bool,
                     label_smoothing: float, row_ids: Optional[torch.Tensor] = None,
                     col_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_scalar_values(logit_scale, logit_bias)
    a, b = image.contiguous(), text.contiguous()
    n, m = a.shape[0], b.shape[0]
    dtype = compute_dtype(a.dtype)
    row_lse, col_lse = KERNELS.for_inputs(a).lse(a, b, logit_scale, symmetric)
    row_positives, col_positives = _infonce_positive_sums(a, b, logit_scale, label_offset, symmetric, row_ids, col_ids)
    smooth = (label_smoothing * logit_scale.reshape(()).to(dtype) * (a.to(dtype).sum(0) @ b.to(dtype).sum(0))
              / (n * m) if label_smoothing else 0.0)
    loss = infonce_from_lse(row_lse, row_positives, label_smoothing, smooth)
    if symmetric:
        loss = (loss + infonce_from_lse(col_lse, col_positives, label_smoothing, smooth)) / 2
    return loss, row_lse, col_lse


@contrastive_loss.register_fake
def _(image, text, logit_scale, logit_bias, label_offset, symmetric, label_smoothing, row_ids=None, col_ids=None):
    dtype = compute_dtype(image.dtype)
    return (image.new_empty((), dtype=dtype), image.new_empty(image.shape[0], dtype=dtype),
            image.new_empty(text.shape[0] if symmetric else 0, dtype=dtype))


def _softmax_contractions(image, text, logit_scale, row_lse, col_lse, symmetric):
    """The softmax part of an InfoNCE backward: ``(a_c, b_c, Abar, Bbar, w_r, w_c)`` with the features in the
    computation dtype and the kernels' ``Abar = (w_r P + w_c Q) @ B``, ``Bbar = (w_r P + w_c Q).T @ A``."""
    a, b = image.contiguous(), text.contiguous()
    dtype = compute_dtype(a.dtype)
    w_row, w_col = _infonce_weights(a.shape[0], b.shape[0], symmetric)
    a_bar, b_bar = KERNELS.for_inputs(a).grad(a, b, logit_scale, row_lse, col_lse, w_row, w_col)
    return a.to(dtype), b.to(dtype), a_bar, b_bar, w_row, w_col


@torch.library.custom_op("clipfast::contrastive_loss_backward", mutates_args=())
def contrastive_loss_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                              logit_scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                              label_offset: int, symmetric: bool, label_smoothing: float,
                              row_ids: Optional[torch.Tensor] = None,
                              col_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a_c, b_c, a_bar, b_bar, w_row, w_col = _softmax_contractions(image, text, logit_scale, row_lse, col_lse, symmetric)
    n, m = a_c.shape[0], b_c.shape[0]
    # Labels: the target part of G (one-hot: weight (1 - eps)(w_r + w_c) on the positive pairs). In place
    # throughout: the distributed losses run this on (N, D) blocks, where every copy counts.
    if row_ids is None:
        subtract_positive_pairs(a_bar, b_bar, a_c, b_c, (1 - label_smoothing) * (w_row + w_col), label_offset)
    else:
        groups = group_sums(a_c, b_c, row_ids, col_ids)
        subtract_group_pairs(a_bar, b_bar, groups,
                             infonce_group_weights(groups, (1 - label_smoothing) * w_row, (1 - label_smoothing) * w_col))
    if label_smoothing:  # uniform part of G: eps (w_r / M + w_c / N) on every pair
        uniform = label_smoothing * (w_row / m + w_col / n)
        a_bar.sub_(b_c.sum(0), alpha=uniform)
        b_bar.sub_(a_c.sum(0), alpha=uniform)
    grad_scale = logit_scale_gradient(grad_loss, logit_scale, (a_c, a_bar))  # before a_bar is scaled in place
    return (feature_gradient(grad_loss, logit_scale, a_bar, image.dtype),
            feature_gradient(grad_loss, logit_scale, b_bar, text.dtype), grad_scale)


@contrastive_loss_backward.register_fake
def _(grad_loss, image, text, logit_scale, row_lse, col_lse, label_offset, symmetric, label_smoothing, row_ids=None,
      col_ids=None):
    return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)


def _contrastive_setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, label_offset, symmetric, label_smoothing, row_ids, col_ids = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse, row_ids, col_ids)
    ctx.args = (label_offset, symmetric, label_smoothing)
    ctx.bias_meta = None if logit_bias is None else (logit_bias.shape, logit_bias.dtype, logit_bias.device)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _contrastive_backward(ctx, grad_loss, grad_row_lse, grad_col_lse):
    image, text, logit_scale, row_lse, col_lse, row_ids, col_ids = ctx.saved_tensors
    grad_image, grad_text, grad_scale = contrastive_loss_backward(
        grad_loss, image, text, logit_scale, row_lse, col_lse, *ctx.args, row_ids, col_ids)
    # The loss does not depend on the bias (softmax is shift-invariant): an exact zero gradient.
    grad_bias = None if ctx.bias_meta is None else torch.zeros(
        ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=ctx.bias_meta[2])
    return grad_image, grad_text, grad_scale, grad_bias, None, None, None, None, None


contrastive_loss.register_autograd(_contrastive_backward, setup_context=_contrastive_setup_context)


# ---------------------------------------------------------------------------------------------------
# Distillation (open_clip's DistillClipLoss): InfoNCE plus the cross-entropy of a teacher's softmax
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("clipfast::distill_loss", mutates_args=())
def distill_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, teacher_image: torch.Tensor,
                 teacher_text: torch.Tensor, teacher_scale: torch.Tensor, label_offset: int,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    _check_scalar_values(logit_scale, None)
    _check_scalar_values(teacher_scale, None)
    a, b = image.contiguous(), text.contiguous()
    ta, tb = teacher_image.contiguous(), teacher_text.contiguous()
    n, m = a.shape[0], b.shape[0]
    kernels = KERNELS.for_inputs(a)
    w_row, w_col = _infonce_weights(n, m, symmetric)
    row_lse, col_lse = kernels.lse(a, b, logit_scale, symmetric)
    teacher_row_lse, teacher_col_lse = kernels.lse(ta, tb, teacher_scale, symmetric)
    # The teacher's G_T = w_r P_T + w_c Q_T contracted with the student's features: O((N + M) D), kept for
    # the backward, where it is the teacher's part of the student's gradient.
    row_target, col_target = kernels.grad(ta, tb, teacher_scale, teacher_row_lse, teacher_col_lse, w_row, w_col, a, b)
    lse_part = w_row * row_lse.sum() + w_col * col_lse.sum()
    contrastive = lse_part - (w_row + w_col) * positive_logit_sum(a, b, logit_scale, label_offset)
    dtype = compute_dtype(a.dtype)
    distill = lse_part - logit_scale.reshape(()).to(dtype) * torch.vdot(a.to(dtype).flatten(), row_target.flatten())
    return contrastive, distill, row_lse, col_lse, row_target, col_target


@distill_loss.register_fake
def _(image, text, logit_scale, teacher_image, teacher_text, teacher_scale, label_offset, symmetric):
    dtype = compute_dtype(image.dtype)
    return (image.new_empty((), dtype=dtype), image.new_empty((), dtype=dtype),
            image.new_empty(image.shape[0], dtype=dtype), image.new_empty(text.shape[0] if symmetric else 0, dtype=dtype),
            image.new_empty(image.shape, dtype=dtype), image.new_empty(text.shape, dtype=dtype))


@torch.library.custom_op("clipfast::distill_loss_backward", mutates_args=())
def distill_loss_backward(grad_contrastive: torch.Tensor, grad_distill: torch.Tensor, image: torch.Tensor,
                          text: torch.Tensor, logit_scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                          row_target: torch.Tensor, col_target: torch.Tensor, label_offset: int,
                          symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Both losses share the student's softmax term, so ONE gradient kernel serves both:
    #   G = (g_c + g_d)(w_r P + w_c Q) - g_c (w_r + w_c) I_o - g_d G_T.
    a_c, b_c, a_bar, b_bar, w_row, w_col = _softmax_contractions(image, text, logit_scale, row_lse, col_lse, symmetric)
    g_c, g_d = grad_contrastive.to(a_c.dtype), grad_distill.to(a_c.dtype)
    for bar, target in ((a_bar, row_target), (b_bar, col_target)):
        bar.mul_(g_c + g_d).addcmul_(target, g_d, value=-1)
    subtract_positive_pairs(a_bar, b_bar, a_c * g_c, b_c * g_c, w_row + w_col, label_offset)
    one = a_bar.new_ones(())  # the upstream gradients are already in G
    grad_scale = logit_scale_gradient(one, logit_scale, (a_c, a_bar))  # before a_bar is scaled in place
    return (feature_gradient(one, logit_scale, a_bar, image.dtype), feature_gradient(one, logit_scale, b_bar, text.dtype),
            grad_scale)


@distill_loss_backward.register_fake
def _(grad_contrastive, grad_distill, image, text, logit_scale, row_lse, col_lse, row_target, col_target,
      label_offset, symmetric):
    return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)


def _distill_setup_context(ctx, inputs, output):
    image, text, logit_scale, teacher_image, teacher_text, teacher_scale, label_offset, symmetric = inputs
    _, _, row_lse, col_lse, row_target, col_target = output
    ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse, row_target, col_target)
    ctx.args = (label_offset, symmetric)
    ctx.mark_non_differentiable(row_lse, col_lse, row_target, col_target)


def _distill_backward(ctx, grad_contrastive, grad_distill, grad_row_lse, grad_col_lse, grad_row_target,
                      grad_col_target):
    image, text, logit_scale, row_lse, col_lse, row_target, col_target = ctx.saved_tensors
    grads = distill_loss_backward(grad_contrastive, grad_distill, image, text, logit_scale, row_lse, col_lse,
                                  row_target, col_target, *ctx.args)
    # The teacher is frozen (clipfast.functional refuses teacher tensors that require grad).
    return (*grads, None, None, None, None, None)


distill_loss.register_autograd(_distill_backward, setup_context=_distill_setup_context)


# ---------------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("clipfast::siglip_loss", mutates_args=())
def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                label_offset: int, negative_only: bool, row_ids: Optional[torch.Tensor] = None,
                col_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_scalar_values(logit_scale, logit_bias)
    a, b = image.contiguous(), text.contiguous()
    n = a.shape[0]
    dtype = compute_dtype(a.dtype)
    total = KERNELS.for_inputs(a).softplus(a, b, logit_scale, logit_bias).sum()
    bias = logit_bias.reshape(()).to(dtype)
    # softplus(-x) = softplus(x) - x on the positive pairs
    if row_ids is not None:
        groups = group_sums(a, b, row_ids, col_ids)
        total = total - (groups.pair_logit_sums(logit_scale).sum() + bias * (groups.row_count * groups.col_count).sum())
    elif not negative_only:
        total = total - (positive_logit_sum(a, b, logit_scale, label_offset) + n * bias)
    return total / n


@siglip_loss.register_fake
def _(image, text, logit_scale, logit_bias, label_offset, negative_only, row_ids=None, col_ids=None):
    return image.new_empty((), dtype=compute_dtype(image.dtype))


@torch.library.custom_op("clipfast::siglip_loss_backward", mutates_args=())
def siglip_loss_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                         logit_scale: torch.Tensor, logit_bias: torch.Tensor, label_offset: int,
                         negative_only: bool, row_ids: Optional[torch.Tensor] = None,
                         col_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    a, b = image.contiguous(), text.contiguous()
    n = a.shape[0]
    dtype = compute_dtype(a.dtype)
    a_bar, b_bar, row_sum = KERNELS.for_inputs(a).siglip_grad(a, b, logit_scale, logit_bias)
    a_c = a.to(dtype)
    sigmoid_total = row_sum.sum()
    # the -[positive] part of G, after accumulation
    if row_ids is not None:
        groups = group_sums(a_c, b, row_ids, col_ids)
        subtract_group_pairs(a_bar, b_bar, groups, torch.ones_like(groups.row_count))  # z = +1: weight 1 each
        sigmoid_total = sigmoid_total - (groups.row_count * groups.col_count).sum()
    elif not negative_only:
        subtract_positive_pairs(a_bar, b_bar, a_c, b.to(dtype), 1.0, label_offset)
        sigmoid_total = sigmoid_total - n
    g = grad_loss.to(dtype) / n
    grad_bias = (g * sigmoid_total).reshape(logit_bias.shape).to(logit_bias.dtype)
    grad_scale = logit_scale_gradient(g, logit_scale, (a_c, a_bar))  # before feature_gradient scales a_bar in place
    return (feature_gradient(g, logit_scale, a_bar, image.dtype), feature_gradient(g, logit_scale, b_bar, text.dtype),
            grad_scale, grad_bias)


@siglip_loss_backward.register_fake
def _(grad_loss, image, text, logit_scale, logit_bias, label_offset, negative_only, row_ids=None, col_ids=None):
    return (torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale),
            torch.empty_like(logit_bias))


def _siglip_setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, label_offset, negative_only, row_ids, col_ids = inputs
    ctx.save_for_backward(image, text, logit_scale, logit_bias, row_ids, col_ids)
    ctx.args = (label_offset, negative_only)


def _siglip_backward(ctx, grad_loss):
    image, text, logit_scale, logit_bias, row_ids, col_ids = ctx.saved_tensors
    grads = siglip_loss_backward(grad_loss, image, text, logit_scale, logit_bias, *ctx.args, row_ids, col_ids)
    return (*grads, None, None, None, None)


siglip_loss.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)
