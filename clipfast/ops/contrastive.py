"""Registration of the fused contrastive losses as PyTorch custom ops, with fakes and autograd.

Ops (all ``mutates_args=()``, shapes of every output known from input shapes alone):

- ``clipfast::contrastive_loss(image, text, logit_scale, logit_bias, label_offset, symmetric,
  label_smoothing) -> (loss, row_lse, col_lse)``: InfoNCE. ``loss`` is a 0-d tensor, ``row_lse``
  ``(N,)`` and ``col_lse`` ``(M,)`` (``(0,)`` when not symmetric) are the log-sum-exps of the
  unbiased logits ``S = s * A @ B.T`` that backward needs. ``logit_bias`` is accepted and ignored:
  softmax is shift-invariant, so the loss does not depend on it and its gradient is exactly zero.
- ``clipfast::contrastive_loss_backward(...) -> (grad_image, grad_text, grad_logit_scale)``.
- ``clipfast::siglip_loss(image, text, logit_scale, logit_bias, label_offset, negative_only) -> loss``.
- ``clipfast::siglip_loss_backward(...) -> (grad_image, grad_text, grad_logit_scale, grad_logit_bias)``.

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
    grad: Callable  # (x, y, scale, row_lse, col_lse, row_weight, col_weight) -> (G @ y, G.T @ x)
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
        grad=lambda x, y, scale, row_lse, col_lse, row_weight, col_weight: (_out(x, *x.shape), _out(x, *y.shape)),
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


@torch.library.custom_op("clipfast::contrastive_loss", mutates_args=())
def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: Optional[torch.Tensor], label_offset: int, symmetric: bool,
                     label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_scalar_values(logit_scale, logit_bias)
    a, b = image.contiguous(), text.contiguous()
    n, m = a.shape[0], b.shape[0]
    dtype = compute_dtype(a.dtype)
    row_lse, col_lse = KERNELS.for_inputs(a).lse(a, b, logit_scale, symmetric)
    positives = positive_logit_sum(a, b, logit_scale, label_offset)
    smooth = (label_smoothing * logit_scale.reshape(()).to(dtype) * (a.to(dtype).sum(0) @ b.to(dtype).sum(0))
              / (n * m) if label_smoothing else 0.0)
    loss = infonce_from_lse(row_lse, positives, label_smoothing, smooth)
    if symmetric:
        loss = (loss + infonce_from_lse(col_lse, positives, label_smoothing, smooth)) / 2
    return loss, row_lse, col_lse


@contrastive_loss.register_fake
def _(image, text, logit_scale, logit_bias, label_offset, symmetric, label_smoothing):
    dtype = compute_dtype(image.dtype)
    return (image.new_empty((), dtype=dtype), image.new_empty(image.shape[0], dtype=dtype),
            image.new_empty(text.shape[0] if symmetric else 0, dtype=dtype))


@torch.library.custom_op("clipfast::contrastive_loss_backward", mutates_args=())
def contrastive_loss_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                              logit_scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                              label_offset: int, symmetric: bool,
                              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = image.contiguous(), text.contiguous()
    n, m = a.shape[0], b.shape[0]
    dtype = compute_dtype(a.dtype)
    w_row, w_col = _infonce_weights(n, m, symmetric)
    a_bar, b_bar = KERNELS.for_inputs(a).grad(a, b, logit_scale, row_lse, col_lse, w_row, w_col)
    a_c, b_c = a.to(dtype), b.to(dtype)
    # Labels: the one-hot part of G, weight (1 - eps)(w_r + w_c) on the positive pairs. In place
    # throughout: the distributed losses run this on (N, D) blocks, where every copy counts.
    subtract_positive_pairs(a_bar, b_bar, a_c, b_c, (1 - label_smoothing) * (w_row + w_col), label_offset)
    if label_smoothing:  # uniform part of G: eps (w_r / M + w_c / N) on every pair
        uniform = label_smoothing * (w_row / m + w_col / n)
        a_bar.sub_(b_c.sum(0), alpha=uniform)
        b_bar.sub_(a_c.sum(0), alpha=uniform)
    grad_scale = logit_scale_gradient(grad_loss, logit_scale, (a_c, a_bar))  # before a_bar is scaled in place
    return (feature_gradient(grad_loss, logit_scale, a_bar, image.dtype),
            feature_gradient(grad_loss, logit_scale, b_bar, text.dtype), grad_scale)


@contrastive_loss_backward.register_fake
def _(grad_loss, image, text, logit_scale, row_lse, col_lse, label_offset, symmetric, label_smoothing):
    return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)


def _contrastive_setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, label_offset, symmetric, label_smoothing = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse)
    ctx.args = (label_offset, symmetric, label_smoothing)
    ctx.bias_meta = None if logit_bias is None else (logit_bias.shape, logit_bias.dtype, logit_bias.device)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _contrastive_backward(ctx, grad_loss, grad_row_lse, grad_col_lse):
    image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
    grad_image, grad_text, grad_scale = contrastive_loss_backward(
        grad_loss, image, text, logit_scale, row_lse, col_lse, *ctx.args)
    # The loss does not depend on the bias (softmax is shift-invariant): an exact zero gradient.
    grad_bias = None if ctx.bias_meta is None else torch.zeros(
        ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=ctx.bias_meta[2])
    return grad_image, grad_text, grad_scale, grad_bias, None, None, None


contrastive_loss.register_autograd(_contrastive_backward, setup_context=_contrastive_setup_context)


# ---------------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("clipfast::siglip_loss", mutates_args=())
def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                label_offset: int, negative_only: bool) -> torch.Tensor:
    _check_scalar_values(logit_scale, logit_bias)
    a, b = image.contiguous(), text.contiguous()
    n = a.shape[0]
    dtype = compute_dtype(a.dtype)
    total = KERNELS.for_inputs(a).softplus(a, b, logit_scale, logit_bias).sum()
    if not negative_only:  # softplus(-x) = softplus(x) - x on the positive pairs
        total = total - (positive_logit_sum(a, b, logit_scale, label_offset) + n * logit_bias.reshape(()).to(dtype))
    return total / n


@siglip_loss.register_fake
def _(image, text, logit_scale, logit_bias, label_offset, negative_only):
    return image.new_empty((), dtype=compute_dtype(image.dtype))


@torch.library.custom_op("clipfast::siglip_loss_backward", mutates_args=())
def siglip_loss_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                         logit_scale: torch.Tensor, logit_bias: torch.Tensor, label_offset: int,
                         negative_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = image.contiguous(), text.contiguous()
    n = a.shape[0]
    dtype = compute_dtype(a.dtype)
    a_bar, b_bar, row_sum = KERNELS.for_inputs(a).siglip_grad(a, b, logit_scale, logit_bias)
    a_c = a.to(dtype)
    sigmoid_total = row_sum.sum()
    if not negative_only:  # the -I_o part of G, after accumulation
        subtract_positive_pairs(a_bar, b_bar, a_c, b.to(dtype), 1.0, label_offset)
        sigmoid_total = sigmoid_total - n
    g = grad_loss.to(dtype) / n
    grad_bias = (g * sigmoid_total).reshape(logit_bias.shape).to(logit_bias.dtype)
    grad_scale = logit_scale_gradient(g, logit_scale, (a_c, a_bar))  # before feature_gradient scales a_bar in place
    return (feature_gradient(g, logit_scale, a_bar, image.dtype), feature_gradient(g, logit_scale, b_bar, text.dtype),
            grad_scale, grad_bias)


@siglip_loss_backward.register_fake
def _(grad_loss, image, text, logit_scale, logit_bias, label_offset, negative_only):
    return (torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale),
            torch.empty_like(logit_bias))


def _siglip_setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, label_offset, negative_only = inputs
    ctx.save_for_backward(image, text, logit_scale, logit_bias)
    ctx.args = (label_offset, negative_only)


def _siglip_backward(ctx, grad_loss):
    image, text, logit_scale, logit_bias = ctx.saved_tensors
    grads = siglip_loss_backward(grad_loss, image, text, logit_scale, logit_bias, *ctx.args)
    return (*grads, None, None)


siglip_loss.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)
