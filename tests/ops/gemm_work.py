"""GEMM-work accounting and tf32 emulation for Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

DESIGN.md section 8: every GEMM-shaped kernel states how many GEMM-equivalents it executes, and a test counts
them. Under the interpreter each executed ``tl.dot`` is one call of ``InterpreterBuilder.create_dot`` with the
program's operand blocks, ``a: (M, K)`` and ``b: (K, N)`` (padding included: it is executed work), so
``2 * M * K * N`` flops per call is exactly what the kernel would issue on a GPU.

    with count_dot_flops() as work:
        run_the_kernels()
    assert work.flops == expected           # also work.calls, work.by_shape
    gemm_equivalents(work.flops, m, k, n)   # work / (2 m k n): in units of one (m x k) @ (k x n) product

The interpreter does not round fp32 operands to tf32: a ``tl.dot(input_precision="tf32")`` multiplies exact
fp32 there. On NVIDIA GPUs Triton hands the fp32 registers to the tf32 ``mma``/``wgmma`` unconverted (no
``cvt.rna.tf32`` in the PTX), and the tensor cores read only the top 19 bits: each operand is truncated to
10 mantissa bits (relative error below 2^-10). :func:`emulate_tf32_dot` reproduces that, so tf32 error
bounds tested on the CPU mean what they say on the GPU.

The interpreter's ``tl.dot`` is one ``np.matmul`` (BLAS): how an output element is rounded depends on where
it sits in the block (BLAS micro-kernels and edge paths sum in different orders), so the dot products of two
copies of a token can differ in the last bit. On a GPU they cannot: every output element of an ``mma`` /
``wgmma`` (or of the FMA loop of an "ieee" fp32 dot) is accumulated by the same sequence of k-steps whatever
its row and column in the tile, so equal operand rows and columns give bitwise equal results.
:func:`position_independent_dot` reproduces that, for kernels whose guarantees rest on it (exact zeros between
duplicate tokens in the token-medoid distances).

Importable as ``gemm_work`` from tests/ops (pytest puts the test file's folder on ``sys.path``, and so does
running an AOT worker script). The context managers wrap whatever ``create_dot`` is installed (e.g. the bf16 fix of
``clipfast.triton_kernels.interpreter_patches``), nest in any order, and restore it on exit. They only make
sense under the interpreter and raise ``RuntimeError`` otherwise.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DotWork", "count_dot_flops", "emulate_tf32_dot", "gemm_equivalents", "position_independent_dot",
           "tf32_truncate"]


@dataclass
class DotWork:
    """What the ``tl.dot`` calls executed inside :func:`count_dot_flops` added up to."""

    flops: int = 0  # sum of 2 * M * K * N
    calls: int = 0  # executed tl.dot instances (one per program per loop iteration)
    by_shape: collections.Counter = field(default_factory=collections.Counter)  # (M, K, N) -> calls

    def gemm_equivalents(self, m: int, k: int, n: int) -> float:
        return gemm_equivalents(self.flops, m, k, n)


def gemm_equivalents(flops: int, m: int, k: int, n: int) -> float:
    """``flops`` in units of one ``(m x k) @ (k x n)`` product (``2 m k n`` flops)."""
    return flops / (2.0 * m * k * n)


def _builder_class():
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("tl.dot accounting needs the Triton interpreter (TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import InterpreterBuilder

    return InterpreterBuilder


@contextlib.contextmanager
def _wrapped_create_dot(make_wrapper):
    cls = _builder_class()
    original = cls.__dict__["create_dot"]
    cls.create_dot = make_wrapper(original)
    try:
        yield
    finally:
        cls.create_dot = original


@contextlib.contextmanager
def count_dot_flops():
    """Count every ``tl.dot`` the interpreter executes in the block; yields a :class:`DotWork`."""
    work = DotWork()

    def make_wrapper(original):
        def create_dot(self, a, b, *args, **kwargs):
            (m, k), (k2, n) = a.data.shape[-2:], b.data.shape[-2:]
            batch = int(np.prod(a.data.shape[:-2], dtype=np.int64))
            assert k == k2, f"tl.dot operand shapes {a.data.shape} @ {b.data.shape}"
            work.flops += 2 * batch * m * k * n
            work.calls += 1
            work.by_shape[(m, k, n)] += 1
            return original(self, a, b, *args, **kwargs)

        return create_dot

    with _wrapped_create_dot(make_wrapper):
        yield work


def tf32_truncate(values: np.ndarray) -> np.ndarray:
    """fp32 values with the 13 low mantissa bits cleared: what a tf32 tensor core reads from them."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@contextlib.contextmanager
def emulate_tf32_dot():
    """Opt-in: ``tl.dot(input_precision="tf32")`` on fp32 operands truncates them to tf32 first, as the GPU
    does (see the module docstring). Other precisions and dtypes are untouched."""
    from triton._C.libtriton import ir
    from triton.language import float32
    from triton.runtime.interpreter import TensorHandle

    tf32 = ir.INPUT_PRECISION.TF32

    def to_tf32(handle):
        if handle.get_element_ty() != float32:
            return handle
        return TensorHandle(tf32_truncate(handle.data), float32)

    def make_wrapper(original):
        def create_dot(self, a, b, d, input_precision, *args, **kwargs):
            if input_precision == tf32:
                a, b = to_tf32(a), to_tf32(b)
            return original(self, a, b, d, input_precision, *args, **kwargs)

        return create_dot

    with _wrapped_create_dot(make_wrapper):
        yield


@contextlib.contextmanager
def position_independent_dot():
    """Opt-in: every ``tl.dot`` is accumulated k by k in a fixed order, the same for every output element:
    ``acc = fl(acc + fl(a[:, k] b[k, :]))`` for k = 0 .. K - 1, each step a rank-1 call of the installed
    ``create_dot`` (a single product per element: no BLAS summation order). Equal rows of ``a`` and equal
    columns of ``b`` then give bitwise equal outputs wherever they sit, as on a GPU (module docstring).

    Composes with the other wrappers: entered before :func:`count_dot_flops` (``with
    position_independent_dot(), count_dot_flops()``) the count sees the kernel's calls unsplit; entered after
    it, ``flops`` is unchanged and ``calls`` / ``by_shape`` count the K rank-1 steps. Operand conversions of
    inner wrappers (bf16 widening, tf32 truncation) are element-wise, so they apply the same per slice."""
    from triton.runtime.interpreter import TensorHandle

    def make_wrapper(original):
        def create_dot(self, a, b, d, *args, **kwargs):
            k = a.data.shape[-1]
            acc = d
            for step in range(k):
                a_k = TensorHandle(np.ascontiguousarray(a.data[..., step:step + 1]), a.dtype.scalar)
                b_k = TensorHandle(np.ascontiguousarray(b.data[..., step:step + 1, :]), b.dtype.scalar)
                acc = original(self, a_k, b_k, acc, *args, **kwargs)
            return acc

        return create_dot

    with _wrapped_create_dot(make_wrapper):
        yield
