"""Registration of token merging (ToMe's bipartite soft matching and size-weighted merge) as custom ops.

Ops (``mutates_args=()``; semantics: :mod:`clipfast.reference.token_merge`):

- ``clipfast::token_merge_match(metric, r, num_prefix) -> dest``: ``metric (B, N, C)`` float ->
  ``(B, N)`` int64, the output row of every token. Not differentiable (indices).
- ``clipfast::token_merge_reduce(x, dest, size, num_out) -> (merged, merged_size)``: the size-weighted
  mean of every output row's sources, ``(B, N', D)`` in x's dtype and ``(B, N')`` in the computation
  dtype; differentiable w.r.t. ``x`` through
- ``clipfast::token_merge_reduce_backward(grad_merged, dest, size, merged_size) -> grad_x``: every input
  row reads its one output row (no scatter, no atomics).

Backends: ``cpu`` (C++, csrc/cpu/token_merge.cpp), ``triton`` (triton_kernels/token_merge.py), ``cuda``
(csrc/cuda/token_merge.cu, opt-in) and ``reference``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from clipfast import backends
from clipfast.dtypes import compute_dtype
from clipfast.inputs import check_no_nan
from clipfast.reference import token_merge as reference


class TokenMergeKernels(NamedTuple):
    """The three kernels every backend provides; contract: :mod:`clipfast.reference.token_merge`."""
    match: Callable  # (metric, r, num_prefix) -> dest (B, N)
    reduce: Callable  # (x, dest, size, num_out) -> (merged (B, N', D), merged_size (B, N'))
    reduce_backward: Callable  # (grad_merged, dest, size, merged_size) -> grad_x (B, N, D)


def _triton_kernels() -> TokenMergeKernels:
    from clipfast.triton_kernels import token_merge as triton

    return TokenMergeKernels(triton.token_merge_match_triton, triton.token_merge_reduce_triton,
                             triton.token_merge_reduce_backward_triton)


def _match_fake(metric, r, num_prefix):
    return metric.new_empty(metric.shape[:2], dtype=torch.int64)


def _reduce_fake(x, dest, size, num_out):
    return (x.new_empty((x.shape[0], num_out, x.shape[2])),
            x.new_empty((x.shape[0], num_out), dtype=compute_dtype(x.dtype)))


def _reduce_backward_fake(grad_merged, dest, size, merged_size):
    return grad_merged.new_empty((*dest.shape, grad_merged.shape[2]))


KERNELS = backends.OpKernels("token_merge",
                             reference=TokenMergeKernels(reference.token_merge_match_reference,
                                                         reference.token_merge_reduce_reference,
                                                         reference.token_merge_reduce_backward_reference),
                             native=TokenMergeKernels("token_merge_match", "token_merge_reduce",
                                                      "token_merge_reduce_backward"),
                             triton=_triton_kernels,
                             native_fakes=TokenMergeKernels(_match_fake, _reduce_fake, _reduce_backward_fake))


@torch.library.custom_op("clipfast::token_merge_match", mutates_args=())
def token_merge_match(metric: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    # Indices cannot carry a NaN (clipfast.inputs.NON_FINITE_RULE): checked in the op body, so compiled
    # graphs keep it without a graph break; the metric is small (C = a head's width) next to the tokens.
    check_no_nan(metric, "metric (token_merge)")
    return KERNELS.for_inputs(metric).match(metric, r, num_prefix)


@torch.library.custom_op("clipfast::token_merge_reduce", mutates_args=())
def token_merge_reduce(x: torch.Tensor, dest: torch.Tensor, size: Optional[torch.Tensor],
                       num_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS.for_inputs(x).reduce(x, dest, size, num_out)


@torch.library.custom_op("clipfast::token_merge_reduce_backward", mutates_args=())
def token_merge_reduce_backward(grad_merged: torch.Tensor, dest: torch.Tensor, size: Optional[torch.Tensor],
                                merged_size: torch.Tensor) -> torch.Tensor:
    return KERNELS.for_inputs(grad_merged).reduce_backward(grad_merged.contiguous(), dest, size, merged_size)


token_merge_match.register_fake(_match_fake)
token_merge_reduce.register_fake(_reduce_fake)
token_merge_reduce_backward.register_fake(_reduce_backward_fake)


def _setup_context(ctx, inputs, output):
    x, dest, size, num_out = inputs
    ctx.save_for_backward(dest, size, output[1])


def _backward(ctx, grad_merged, grad_merged_size):
    dest, size, merged_size = ctx.saved_tensors
    # The sizes are counts, not differentiable (as in ToMe): grad_merged_size is ignored.
    return token_merge_reduce_backward(grad_merged, dest, size, merged_size), None, None, None


token_merge_reduce.register_autograd(_backward, setup_context=_setup_context)
