"""Registration of attentive token removal (A-CLIP, EViT) as custom ops (fakes, autograd).

Ops (``mutates_args=()``; semantics: :mod:`clipfast.reference.token_keep`):

- ``clipfast::token_keep_index(scores, num_keep, grid_width, block) -> keep_index``: ``scores (B, L)``
  float32/float64 -> ``(B, K)`` int64 ascending. Not differentiable (indices).
- ``clipfast::token_keep_gather(tokens, keep_index, fuse_weights, num_prefix) -> kept``: the prefix, the
  kept patch rows and (with ``fuse_weights``) EViT's fused token; differentiable w.r.t. ``tokens`` and
  ``fuse_weights`` through
- ``clipfast::token_keep_gather_backward(grad_kept, tokens, keep_index, fuse_weights, num_prefix)
  -> (grad_tokens, grad_weights)``: a row scatter with no atomics (indices are unique per row).

Backends: ``cpu`` (C++, csrc/cpu/token_keep.cpp), ``triton`` (triton_kernels/token_keep.py), ``cuda``
(csrc/cuda/token_keep.cu, opt-in) and ``reference``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from clipfast import backends
from clipfast.dtypes import compute_dtype
from clipfast.reference import token_keep as reference


class TokenKeepKernels(NamedTuple):
    """The three kernels every backend provides; contract: :mod:`clipfast.reference.token_keep`."""
    index: Callable  # (scores, num_keep, grid_width, block) -> keep_index (B, K)
    gather: Callable  # (tokens, keep_index, fuse_weights, num_prefix) -> kept
    gather_backward: Callable  # (grad_kept, tokens, keep_index, fuse_weights, num_prefix) -> (grad_tokens, grad_weights)


def _triton_kernels() -> TokenKeepKernels:
    from clipfast.triton_kernels import token_keep as triton

    return TokenKeepKernels(triton.token_keep_index_triton, triton.token_keep_gather_triton,
                            triton.token_keep_gather_backward_triton)


def _index_fake(scores, num_keep, grid_width, block):
    return scores.new_empty((scores.shape[0], num_keep), dtype=torch.int64)


def _kept_rows(tokens, keep_index, fuse_weights, num_prefix) -> int:
    # An int, never a bool: under fake tensors ``keep_index.shape[1]`` may be symbolic, and torch 2.11's
    # symbolic sizes reject ``SymInt + bool`` (sympy's BooleanFalse in a size expression).
    return num_prefix + keep_index.shape[1] + (0 if fuse_weights is None else 1)


def _gather_fake(tokens, keep_index, fuse_weights, num_prefix):
    return tokens.new_empty((tokens.shape[0], _kept_rows(tokens, keep_index, fuse_weights, num_prefix),
                             tokens.shape[2]))


def _gather_backward_fake(grad_kept, tokens, keep_index, fuse_weights, num_prefix):
    weights = 0 if fuse_weights is None else tokens.shape[1] - num_prefix
    return torch.empty_like(tokens), tokens.new_empty((tokens.shape[0], weights), dtype=compute_dtype(tokens.dtype))


KERNELS = backends.OpKernels("token_keep",
                             reference=TokenKeepKernels(reference.token_keep_index_reference,
                                                        reference.token_keep_gather_reference,
                                                        reference.token_keep_gather_backward_reference),
                             native=TokenKeepKernels("token_keep_index", "token_keep_gather",
                                                     "token_keep_gather_backward"),
                             triton=_triton_kernels,
                             native_fakes=TokenKeepKernels(_index_fake, _gather_fake, _gather_backward_fake))


@torch.library.custom_op("clipfast::token_keep_index", mutates_args=())
def token_keep_index(scores: torch.Tensor, num_keep: int, grid_width: int, block: int) -> torch.Tensor:
    return KERNELS.for_inputs(scores).index(scores, num_keep, grid_width, block)


token_keep_index.register_fake(_index_fake)


@torch.library.custom_op("clipfast::token_keep_gather", mutates_args=())
def token_keep_gather(tokens: torch.Tensor, keep_index: torch.Tensor, fuse_weights: Optional[torch.Tensor],
                      num_prefix: int) -> torch.Tensor:
    return KERNELS.for_inputs(tokens).gather(tokens, keep_index, fuse_weights, num_prefix)


@torch.library.custom_op("clipfast::token_keep_gather_backward", mutates_args=())
def token_keep_gather_backward(grad_kept: torch.Tensor, tokens: torch.Tensor, keep_index: torch.Tensor,
                               fuse_weights: Optional[torch.Tensor],
                               num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS.for_inputs(tokens).gather_backward(grad_kept.contiguous(), tokens, keep_index, fuse_weights,
                                                     num_prefix)


token_keep_gather.register_fake(_gather_fake)
token_keep_gather_backward.register_fake(_gather_backward_fake)


def _setup_context(ctx, inputs, output):
    tokens, keep_index, fuse_weights, num_prefix = inputs
    # Without fusion the backward reads only the tokens' shape, dtype and device: a one-element stride-0
    # stand-in keeps the activation from being held alive for nothing.
    if fuse_weights is None:
        tokens = tokens.new_zeros(()).expand(tokens.shape)
    ctx.save_for_backward(tokens, keep_index, fuse_weights)
    ctx.num_prefix = num_prefix


def _backward(ctx, grad_kept):
    tokens, keep_index, fuse_weights = ctx.saved_tensors
    grad_tokens, grad_weights = token_keep_gather_backward(grad_kept, tokens, keep_index, fuse_weights,
                                                           ctx.num_prefix)
    return grad_tokens, None, grad_weights if fuse_weights is not None else None, None


token_keep_gather.register_autograd(_backward, setup_context=_setup_context)

