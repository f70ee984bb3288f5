"""`python -m clipfast.info`: versions, native build status and which backend can run each op here."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import clipfast
from clipfast import backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"clipfast         {clipfast.__version__}",
        f"python           {platform.python_version()}",
        f"torch            {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"GPU available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})",
        f"triton           {_version('triton')} (interpreter: {backends.triton_interpreter_enabled()})",
        f"open-clip-torch  {_version('open-clip-torch')}",
        f"native library   {'loaded' if backends.native_available() else backends.native_load_error}",
        f"forced backend   {backends.forced_backend() or 'none (CLIPFAST_BACKEND unset)'}",
        "",
        f"{'op':<12} {'backend':<10} {'device':<7} status",
    ]
    for row in backends.capability_table():
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        lines.append(f"{row['op']:<12} {row['backend']:<10} {row['device']:<7} {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
