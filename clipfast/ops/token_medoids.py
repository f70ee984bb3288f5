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

from typing import Callable, NamedTuple

import torch

from clipfast import backends
from clipfast.inputs import check_no_nan
from clipfast.reference import token_medoids as reference


class TokenMedoidsKernels(NamedTuple):
    """The one kernel every backend provides; contract: :mod:`clipfast.reference.token_medoids`."""
    index: Callable  # (x, num_medoids, metric, max_iters, split_size) -> (medoid_index (R, K), assignment (R, N))


def _triton_kernels() -> TokenMedoidsKernels:
    from clipfast.triton_kernels import token_medoids as triton

    return TokenMedoidsKernels(triton.token_medoids_index_triton)


def _index_fake(x, num_medoids, metric, max_iters, split_size):
    return (x.new_empty((x.shape[0], num_medoids), dtype=torch.int64),
            x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int64))


KERNELS = backends.OpKernels("token_medoids",
                             reference=TokenMedoidsKernels(reference.token_medoids_index_reference),
                             native=TokenMedoidsKernels("token_medoids_index"), triton=_triton_kernels,
                             native_fakes=TokenMedoidsKernels(_index_fake))


@torch.library.custom_op("clipfast::token_medoids_index", mutates_args=())
def token_medoids_index(x: torch.Tensor, num_medoids: int, metric: str, max_iters: int,
                        split_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Indices cannot carry a NaN (clipfast.inputs.NON_FINITE_RULE): checked here, in the op body, so
    # torch.compile graphs keep the check without a graph break; on CUDA an async device assert (no host
    # sync). The C++ CPU kernel raises the same ValueError itself from the pass that reads each row from
    # memory (csrc/cpu/token_medoids.cpp): a separate pass over x would read it once more.
    backend = backends.select(KERNELS.op, x.device, x.dtype)
    if backend != "cpu":
        check_no_nan(x, "x (token_medoids)")
    return KERNELS.kernels(backend).index(x, num_medoids, metric, max_iters, split_size)


token_medoids_index.register_fake(_index_fake)

