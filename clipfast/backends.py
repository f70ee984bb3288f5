"""Which kernel runs each op: the capability table, the default choice and forced backends.

Backends:

- ``reference``: pure PyTorch (``clipfast.reference``), any device, materialises what the fused
  kernels avoid; the specification and the fallback.
- ``cpu``: the C++ kernels of the native library ``clipfast._C`` (CPU tensors).
- ``triton``: the Triton kernels (``clipfast.triton_kernels``) on CUDA tensors, and on CPU tensors
  when ``TRITON_INTERPRET=1`` was set before the first kernel import (testing without a GPU).
- ``cuda``: the hand-written CUDA kernels of ``clipfast._C``; opt-in until verified on a GPU.

Default per device: CPU tensors go to ``cpu`` (or ``reference`` when the native library is missing),
CUDA tensors to ``triton`` (or ``cuda``, then ``reference``). A backend is forced for every op with the
environment variable ``CLIPFAST_BACKEND`` or with :func:`use_backend`, which works as a plain call
and as a context manager::

    with clipfast.use_backend("reference"):
        loss = clipfast.clip_loss(img, txt, scale)

A forced backend that cannot run the given inputs (device or dtype) raises :class:`BackendUnavailableError`, listing
every backend and why it was refused; nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
OPS = ("contrastive", "schur_covariance", "token_medoids", "token_keep")

# Native library ops each clipfast op needs, per op stem (see csrc/clipfast.cpp).
NATIVE_OPS = {
    "contrastive": ("contrastive_lse", "contrastive_grad", "siglip_softplus", "siglip_grad"),
    "schur_covariance": ("feature_gram", "feature_gram_backward"),
    "token_medoids": ("token_medoids_index",),
    "token_keep": ("token_keep_index", "token_keep_gather", "token_keep_gather_backward"),
}

# Ops with Triton kernels (clipfast/triton_kernels/<op>.py).
TRITON_OPS = ("contrastive", "schur_covariance", "token_medoids", "token_keep")

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


def _native_kernel_registered(op: str, dispatch_key: str) -> bool:
    return _NATIVE_LOADED and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"clipfast_C::{name}", dispatch_key)
        for name in NATIVE_OPS[op]
    )


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    return importlib.util.find_spec("triton") is not None


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
    if backend == "cpu":
        if device.type != "cpu":
            return f"runs on CPU tensors only, inputs are on {device}"
        if not _NATIVE_LOADED:
            return native_load_error
        if not _native_kernel_registered(op, "CPU"):
            return "the native library has no CPU kernel for this op"
        return None
    if backend == "triton":
        if op not in TRITON_OPS:
            return "no Triton kernel for this op yet"
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), inputs are on {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"needs CUDA tensors, inputs are on {device}"
        if not _NATIVE_LOADED:
            return native_load_error
        if not _native_kernel_registered(op, "CUDA"):
            if _native_kernel_registered("contrastive", "CUDA"):
                return "no CUDA kernel for this op yet"
            return "clipfast._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        return None


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``CLIPFAST_BACKEND``, or None."""
    if _forced is not None:
        return _forced
    name = os.environ.get("CLIPFAST_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"CLIPFAST_BACKEND={name!r} is not a backend; choose one of {BACKENDS}")
    return name


def _refusals(op: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    return "; ".join(f"{b}: {refusal_reason(op, b, device, dtype) or 'available'}" for b in BACKENDS)


def select(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` for features of ``dtype`` on ``device``."""
    forced = forced_backend()
    if forced is not None:
        reason = refusal_reason(op, forced, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced for {op} but cannot run {dtype} inputs on {device}: {reason}. "
                f"All backends: {_refusals(op, device, dtype)}"
            )
        return forced
    # The CUDA kernels stay opt-in until they have been verified on a GPU (make gpu-check).
    preference = ("cpu", "reference") if device.type == "cpu" else ("triton", "reference")
    for backend in preference:
        if refusal_reason(op, backend, device, dtype) is None:
            return backend
    return "reference"


def available_backends(op: str, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that can run ``op`` on ``device`` (for ``dtype`` features, if given) now."""
    device = torch.device(device)
    return [b for b in BACKENDS if refusal_reason(op, b, device, dtype) is None]


class use_backend:
    """Force ``name`` for every op until :meth:`restore` (or the end of a ``with`` block).

    ``clipfast.use_backend("reference")`` takes effect immediately; as a context manager the previous
    choice is restored on exit. ``use_backend(None)`` returns to the default choice.
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
