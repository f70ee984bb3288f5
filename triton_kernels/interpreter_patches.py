"""Fixes for the Triton CPU interpreter (``TRITON_INTERPRET=1``) needed to test the kernels.

The interpreter stores bfloat16 tensors as their raw uint16 bit patterns and its ``tl.dot``
multiplies those integers directly, so any bf16 ``tl.dot`` returns garbage. GPU tensor cores
multiply bf16 exactly and accumulate in fp32, so widening the operands to fp32 first (exact:
bf16 is the top half of an fp32) reproduces the hardware semantics.
"""

import numpy as np
import triton
import triton.language as tl

__all__ = ["patch_bf16_dot"]

_PATCH_MARK = "_clipfast_bf16_dot_patch"


def _bf16_handle_to_fp32(handle):
    from triton.runtime.interpreter import TensorHandle

    if handle.get_element_ty() != tl.bfloat16:
        return handle
    bits = np.ascontiguousarray(handle.data).astype(np.uint32) << 16
    return TensorHandle(bits.view(np.float32), tl.float32)


def patch_bf16_dot() -> bool:
    """Make the interpreter's ``tl.dot`` correct for bfloat16 operands.

    Idempotent; a no-op (returning False) when the interpreter is not active, since compiled
    kernels are unaffected. Returns True when the patch is in place.
    """
    if not triton.knobs.runtime.interpret:
        return False
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot
    if getattr(original, _PATCH_MARK, False):
        return True

    def create_dot(self, a, b, *args, **kwargs):
        return original(self, _bf16_handle_to_fp32(a), _bf16_handle_to_fp32(b), *args, **kwargs)

    setattr(create_dot, _PATCH_MARK, True)
    InterpreterBuilder.create_dot = create_dot
    return True
