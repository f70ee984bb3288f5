"""Triton GPU kernels of clipfast, installed as `clipfast.triton_kernels`.

Every launcher also accepts CPU tensors when TRITON_INTERPRET=1 is set before the kernels are imported,
which is how they are tested on machines without a GPU. Nothing here is imported by `import clipfast`:
the ops import a kernel module only when the Triton backend is selected.
"""

import torch
import triton

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


# --------------------------------------------------------------------------------------------
# Launch invariants
# --------------------------------------------------------------------------------------------
# User arguments are validated once, by clipfast.functional, clipfast.schur_covariance and the registered ops
# (clipfast/ops/*.py). The launchers are internal: these checks only keep a direct caller that breaks a launch's
# invariants from an out-of-bounds launch, with a RuntimeError (``torch._check``) naming what is wrong. A limit of
# one backend that valid user input can reach (token_medoids' MAX_TOKENS) is no invariant: it stays a ValueError.


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs on Triton's interpreter, which takes CPU tensors.
    Decided when the decorator ran: with TRITON_INTERPRET=1 set before the kernel's module was imported it
    returned an interpreter object instead of a ``JITFunction``."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def describe(t) -> str:
    """``t``'s shape, dtype and device (or its type, for a non-tensor), for a launch-invariant message."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_tensor(t, name: str, ndim: int, dtypes: tuple) -> None:
    """``t`` is an ``ndim``-D tensor of one of ``dtypes``."""
    torch._check(isinstance(t, torch.Tensor) and t.ndim == ndim and t.dtype in dtypes,
                 lambda: f"{name} must be a {ndim}-D tensor of dtype {' or '.join(map(str, dtypes))}, got "
                         f"{describe(t)}")


def check_int(value, name: str, low: int, high=None) -> None:
    """``value`` is a Python int (not a bool) in ``[low, high]`` (``high`` None: no upper bound)."""
    torch._check(isinstance(value, int) and not isinstance(value, bool) and value >= low
                 and (high is None or value <= high),
                 lambda: f"{name} must be an int " + (f">= {low}" if high is None else f"in [{low}, {high}]")
                         + f", got {value!r}")


def check_launch_device(interpreted: bool, **tensors) -> None:
    """The named tensors (None: an absent optional one, skipped) are on one CUDA device, or all on the CPU when
    the launcher's kernels run on the interpreter (``interpreted``, see :func:`is_interpreted`)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    device = next(iter(present.values())).device
    torch._check(all(t.device == device for t in present.values())
                 and (device.type == "cuda" or (device.type == "cpu" and interpreted)),
                 lambda: "the launch's tensors must be on one CUDA device (or the CPU under TRITON_INTERPRET=1 set "
                         "before the kernels are imported), got "
                         + ", ".join(f"{name} on {t.device}" for name, t in present.items()))
