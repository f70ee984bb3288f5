"""Triton GPU kernels of clipfast, installed as `clipfast.triton_kernels`.

Every launcher also accepts CPU tensors when TRITON_INTERPRET=1 is set before the kernels are imported,
which is how they are tested on machines without a GPU. Nothing here is imported by `import clipfast`:
the ops import a kernel module only when the Triton backend is selected.
"""

import torch

INPUT_PRECISIONS = ("ieee", "tf32")


def resolve_input_precision(input_precision, dtype: torch.dtype) -> str:
    """The ``tl.dot`` precision of one launch: ``input_precision`` ("ieee" or "tf32"), or when None PyTorch's
    float32 matmul precision as :func:`clipfast.backends.triton_input_precision` reads it on every call.
    Only fp32 operands have a choice: 16-bit operands always multiply in their own dtype ("ieee" here)."""
    if input_precision is None:
        from clipfast.backends import triton_input_precision

        input_precision = triton_input_precision()
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    return input_precision if dtype == torch.float32 else "ieee"
