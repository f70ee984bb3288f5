"""Which kernel runs each op: one registry of every op's kernels, the default choice and forced backends.

Backends:

- ``reference``: pure PyTorch (``clipfast.reference``), any device, materialises what the fused
  kernels avoid; the specification and the fallback.
- ``cpu``: the C++ kernels of the native library ``clipfast._C`` (CPU tensors).
- ``triton``: the Triton kernels (``clipfast.triton_kernels``) on CUDA tensors, and on CPU tensors
  when ``TRITON_INTERPRET=1`` was set before clipfast was imported (testing without a GPU).
- ``cuda``: the hand-written CUDA kernels of ``clipfast._C``; opt-in until verified on a GPU.

Each op declares its kernels once, in ``ops/<op>.py``, as an :class:`OpKernels`: one kernel set (a
NamedTuple of functions with the same fields) per backend. ``cpu`` and ``cuda`` share one set, the
``torch.ops.clipfast_C`` ops, whose C++ registrations let PyTorch's dispatcher pick the CPU or the CUDA
kernel from the tensors' device. An op body calls ``KERNELS.for_inputs(tensor).<kernel>(...)``: a
cached lookup, then a plain call.

Default per device: CPU tensors go to ``cpu`` (or ``reference`` when the native library is missing),
CUDA tensors to ``triton`` (or ``reference``). A backend is forced for every op with the environment
variable ``CLIPFAST_BACKEND`` (read when clipfast is imported) or with :func:`use_backend`, which works
as a plain call and as a context manager::

    with clipfast.use_backend("reference"):
        loss = clipfast.clip_loss(img, txt, scale)

The choice is cached per (op, device type, dtype, forced backend): nothing is re-read on an op call.
A forced backend that cannot run the given inputs (device or dtype) raises
:class:`BackendUnavailableError`, listing every backend and why it was refused; nothing falls back
silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
OPS = ("contrastive", "schur_covariance", "token_medoids", "token_keep", "token_merge")  # op stems; each declares OpKernels

# Feature dtypes each backend computes (all accumulate in fp32; float64 runs in float64 where listed).
DTYPES = {
    "reference": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}

_log = logging.getLogger("clipfast")

native_load_error: Optional[str] = None  # why clipfast._C did not load, or None
_forced: Optional[str] = None  # set by use_backend()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given device."""


def _native_failure() -> Optional[str]:
    """None when ``clipfast._C`` loaded (registering torch.ops.clipfast_C), else why not, in one line."""
    # A missing library is looked up first: importing an absent submodule of the package being
    # initialised reports a misleading "partially initialized module (circular import)".
    try:
        spec = importlib.util.find_spec("clipfast._C")
    except (ImportError, ValueError) as error:
        return f"native kernels could not be looked up ({error}); using the PyTorch reference"
    if spec is None:
        return ("native kernels not built (installed with CLIPFAST_BUILD_NATIVE=0, or without a C++ compiler); "
                "using the PyTorch reference")
    try:
        importlib.import_module("clipfast._C")
    except (ImportError, OSError) as error:
        return (f"native kernels present but not loadable ({error}); using the PyTorch reference "
                "(rebuild against this torch: pip install --no-build-isolation -e .)")
    return None


def _load_native() -> bool:
    global native_load_error
    native_load_error = _native_failure()
    if native_load_error is not None:
        _log.warning("clipfast: %s", native_load_error)
    return native_load_error is None


_NATIVE_LOADED = _load_native()


def native_available() -> bool:
    """True when the native library ``clipfast._C`` loaded."""
    return _NATIVE_LOADED


# Read once, at import: TRITON_INTERPRET must be set before the first @triton.jit runs anyway, and
# whether triton is installed does not change while the process runs.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return _TRITON_INTERPRET


_PRECISION_OVERRIDES = ("ieee", "tf32")


def triton_input_precision() -> str:
    """``tl.dot`` precision of the Triton kernels for fp32 inputs, following PyTorch's own setting.

    Read once per op call, on the host, inside the registered op (so ``torch.compile`` never bakes a
    stale value into a graph: the op body runs at run time). 16-bit inputs always multiply in their
    own dtype on tensor cores with fp32 accumulation; this only decides fp32:

    ====================================================================  ========  ==============
    PyTorch setting                                                       Triton    error of a dot
    ====================================================================  ========  ==============
    ``torch.backends.cuda.matmul.fp32_precision = "ieee"``, or            ``ieee``  fp32 rounding
    ``torch.set_float32_matmul_precision("highest")`` (the default)                 (FMA, no tensor cores)
    ``fp32_precision = "tf32"``, or ``"high"`` / ``"medium"``             ``tf32``  operands rounded
                                                                                    to 10-bit mantissas
    ====================================================================  ========  ==============

    "medium" allows bf16 internally; Triton offers ``bf16x3``, but that runs three MMAs per product for
    about fp32 accuracy, i.e. slower than tf32 and more precise than "medium" asks: tf32 serves both.
    ``CLIPFAST_TRITON_PRECISION=ieee|tf32`` overrides the PyTorch setting (for experiments; documented
    in the README), read on every call like the setting itself.
    """
    override = os.environ.get("CLIPFAST_TRITON_PRECISION", "").strip().lower()
    if override:
        if override not in _PRECISION_OVERRIDES:
            raise ValueError(f"CLIPFAST_TRITON_PRECISION={override!r}; choose 'ieee' or 'tf32' (or unset it to "
                             "follow torch.backends.cuda.matmul.fp32_precision)")
        return override
    # The per-backend setting (torch >= 2.9) wins; "none" defers to the generic one, then to the legacy
    # float32_matmul_precision, which raises when legacy and new APIs were mixed: then exact fp32.
    for setting in (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                    getattr(torch.backends, "fp32_precision", "none")):
        if setting in ("ieee", "tf32"):
            return setting
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        return "ieee"
    return "ieee" if legacy == "highest" else "tf32"



def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


# ---------------------------------------------------------------------------------------------------
# The registry: every op's kernels, declared once
# ---------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, "OpKernels"] = {}


class OpKernels:
    """One op's kernels per backend, declared once in ``ops/<op>.py``.

    Args:
        op: the op stem (one of :data:`OPS`).
        reference: the kernel set of ``clipfast.reference.<op>``: a NamedTuple of functions, whose field
            names and signatures are the op's kernel contract.
        native: the same NamedTuple holding the names of the ``torch.ops.clipfast_C`` ops (csrc/clipfast.cpp).
            The ``cpu`` and ``cuda`` backends share these ops: the dispatcher picks the C++ kernel
            registered for the tensors' device.
        triton: returns the same NamedTuple of ``triton_kernels/<op>.py`` launchers (imported on first use).
        native_fakes: the same NamedTuple of fake (shape) functions of the native ops, registered with
            ``torch.library.register_fake`` when the native library loaded (opcheck and tracing of the
            ``clipfast_C`` ops themselves).
    """

    def __init__(self, op: str, *, reference, native, triton: Callable, native_fakes) -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; clipfast ops are {OPS}")
        self.op = op
        self.native_names: tuple[str, ...] = tuple(native)
        self._native = native
        self._builders = {"native": self._native_set, "triton": triton}
        self._sets = {"reference": reference}
        self._registered: dict[str, bool] = {}
        _REGISTRY[op] = self
        if _NATIVE_LOADED:
            for name, fake in zip(native, native_fakes):
                torch.library.register_fake(f"clipfast_C::{name}")(fake)

    def for_inputs(self, tensor: torch.Tensor):
        """The kernel set of the backend that runs this op for ``tensor``'s device and dtype."""
        return self.kernels(select(self.op, tensor.device, tensor.dtype))

    def kernels(self, backend: str):
        """The kernel set of ``backend`` (built once; ``cpu`` and ``cuda`` share the one native set)."""
        key = "native" if backend in ("cpu", "cuda") else backend
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = self._builders[key]()
        return found

    def _native_set(self):
        return type(self._native)(*(getattr(torch.ops.clipfast_C, name) for name in self._native))

    def native_registered(self, dispatch_key: str) -> bool:
        """True when every native op of this op has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
        if not _NATIVE_LOADED:
            return False
        found = self._registered.get(dispatch_key)
        if found is None:
            found = self._registered[dispatch_key] = all(
                torch._C._dispatch_has_kernel_for_dispatch_key(f"clipfast_C::{name}", dispatch_key)
                for name in self.native_names)
        return found


def registered_ops() -> dict[str, OpKernels]:
    """Every op's :class:`OpKernels` (filled when ``clipfast.ops`` is imported, i.e. by ``import clipfast``)."""
    return dict(_REGISTRY)


def native_op_names() -> dict[str, tuple[str, ...]]:
    """The ``clipfast_C`` ops each clipfast op needs, per op stem (see csrc/clipfast.cpp)."""
    return {op: kernels.native_names for op, kernels in _REGISTRY.items()}


# ---------------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------------

def refusal_reason(op: str, backend: str, device: torch.device,
                   dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` (with features of ``dtype``), or None when it can."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; clipfast ops are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if dtype is not None and dtype not in DTYPES[backend]:
        return f"does not compute {dtype} (supports {', '.join(str(d) for d in DTYPES[backend])})"
    if backend == "reference":
        return None
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and _TRITON_INTERPRET):
            return None
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), inputs are on {device}"
    native_device = backend  # "cpu" or "cuda": the native library's kernels for that device type
    if device.type != native_device:
        return (f"runs on CPU tensors only, inputs are on {device}" if backend == "cpu"
                else f"needs CUDA tensors, inputs are on {device}")
    if not _NATIVE_LOADED:
        return native_load_error
    if not _REGISTRY[op].native_registered(backend.upper()):
        if backend == "cuda" and not _REGISTRY["contrastive"].native_registered("CUDA"):
            return "clipfast._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        return f"the native library has no {backend.upper()} kernel for this op"
    return None


def _environment_backend() -> tuple[Optional[str], Optional[str]]:
    """(backend forced by CLIPFAST_BACKEND, or None; the error to raise for an unknown name, or None)."""
    name = os.environ.get("CLIPFAST_BACKEND", "").strip().lower()
    if not name:
        return None, None
    if name not in BACKENDS:
        return None, f"CLIPFAST_BACKEND={name!r} is not a backend; choose one of {BACKENDS}"
    return name, None


_ENV_FORCED, _ENV_ERROR = _environment_backend()
_choices: dict[tuple, str] = {}  # (op, device type, dtype, forced backend) -> backend


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or by ``CLIPFAST_BACKEND`` at import, or None."""
    if _forced is not None:
        return _forced
    if _ENV_ERROR is not None:
        raise ValueError(_ENV_ERROR)
    return _ENV_FORCED


def _refusals(op: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    return "; ".join(f"{b}: {refusal_reason(op, b, device, dtype) or 'available'}" for b in BACKENDS)


def select(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` for features of ``dtype`` on ``device`` (cached)."""
    forced = forced_backend()
    key = (op, device.type, dtype, forced)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    if forced is not None:
        reason = refusal_reason(op, forced, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced for {op} but cannot run {dtype} inputs on {device}: {reason}. "
                f"All backends: {_refusals(op, device, dtype)}"
            )
        choice = forced
    else:
        # The CUDA kernels stay opt-in until they have been verified on a GPU (make gpu-check).
        preference = ("cpu", "reference") if device.type == "cpu" else ("triton", "reference")
        choice = next(b for b in preference if refusal_reason(op, b, device, dtype) is None)
    _choices[key] = choice
    return choice


def available_backends(op: str, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that can run ``op`` on ``device`` (for ``dtype`` features, if given) now."""
    device = torch.device(device)
    return [b for b in BACKENDS if refusal_reason(op, b, device, dtype) is None]


class use_backend:
    """Force ``name`` for every op until :meth:`restore` (or the end of a ``with`` block).

    ``clipfast.use_backend("reference")`` takes effect immediately; as a context manager the previous
    choice is restored on exit. ``use_backend(None)`` returns to the default choice (or to the backend
    ``CLIPFAST_BACKEND`` named at import).
    """

    def __init__(self, name: Optional[str]):
        global _forced
        if name is not None and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        self._previous = _forced
        _forced = name

    def restore(self) -> None:
        global _forced
        _forced = self._previous

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def capability_table() -> list[dict]:
    """One row per (op, backend, device type): whether it runs here and why not."""
    gpu = torch.cuda.is_available()
    rows = []
    for op in OPS:
        for backend in BACKENDS:
            for device in (torch.device("cpu"), torch.device("cuda")):
                reason = refusal_reason(op, backend, device)
                if reason is None and device.type == "cuda" and not gpu:
                    reason = "no CUDA device visible (the kernels are present)"
                rows.append({"op": op, "backend": backend, "device": device.type,
                             "available": reason is None, "reason": reason or ""})
    return rows
