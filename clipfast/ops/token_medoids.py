"""Registration of the token-medoid selection (CenterCLIP k-medoids) as a custom op.

``clipfast::token_medoids_index(x, num_medoids, metric, max_iters, split_size) -> (medoid_index, assignment)``:
``x: (R, N, D)`` float; ``medoid_index: (R, K)`` int64 ascending; ``assignment: (R, N)`` int64 into the
sorted medoids (semantics: :mod:`clipfast.reference.token_medoids`). Indices are not differentiable:
the op has no autograd formula and is called on detached input; the differentiable part is the
gather of the chosen tokens (:func:`clipfast.token_medoids`).

Backends: ``cpu`` (C++, csrc/cpu/token_medoids.cpp), ``triton`` (triton_kernels/token_medoids.py, when
present), ``cuda`` (csrc/cuda/token_medoids.cu, opt-in) and ``reference``.
"""

from __future__ import annotations

import functools

import torch

from clipfast import backends
from clipfast.inputs import check_no_nan
from clipfast.reference import token_medoids as reference

OP = "token_medoids"


def _kernel(backend: str):
    if backend == "reference":
        return reference.token_medoids_index_reference
    if backend == "triton":
        from clipfast.triton_kernels import token_medoids as triton_medoids

        # fp32 distance tiles follow PyTorch's float32 matmul precision ("ieee" exact, "tf32" tensor cores).
        return functools.partial(triton_medoids.token_medoids_index_triton,
                                 input_precision=backends.triton_input_precision())
    return torch.ops.clipfast_C.token_medoids_index  # cpu and cuda: dispatched on the tensor's device


@torch.library.custom_op("clipfast::token_medoids_index", mutates_args=())
def token_medoids_index(x: torch.Tensor, num_medoids: int, metric: str, max_iters: int,
                        split_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    backend = backends.select(OP, x.device, x.dtype)
    # Indices cannot carry a NaN (clipfast.inputs.NON_FINITE_RULE): checked here, in the op body,
    # so torch.compile graphs keep the check without a graph break. One pass over x against the kernel's
    # O(N^2 D); on CUDA an async device assert (no host sync).
    check_no_nan(x, "x (token_medoids)")
    return _kernel(backend)(x, num_medoids, metric, max_iters, split_size)


@token_medoids_index.register_fake
def _(x, num_medoids, metric, max_iters, split_size):
    return (x.new_empty((x.shape[0], num_medoids), dtype=torch.int64),
            x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int64))


def _register_native_fake() -> None:
    torch.library.register_fake("clipfast_C::token_medoids_index")(
        lambda x, num_medoids, metric, max_iters, split_size: (
            x.new_empty((x.shape[0], num_medoids), dtype=torch.int64),
            x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int64)))


if backends.native_available():
    _register_native_fake()
