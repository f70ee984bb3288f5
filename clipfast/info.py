"""`python -m clipfast.info`: versions, native build status, the backend each op runs with here and why."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

import clipfast
from clipfast import backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _backend_here(op: str) -> list[tuple[str, str, str]]:
    """(device, backend that runs ``op`` there now, why) for CPU tensors and, when visible, CUDA tensors."""
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            chosen = backends.select(op, device)
        except backends.BackendUnavailableError as error:
            rows.append((device.type, "none", str(error)))
            continue
        forced = backends.forced_backend()
        if forced is not None:
            why = f"forced ({'use_backend' if backends._forced else 'CLIPFAST_BACKEND'}={forced})"
        else:
            skipped = [b for b in (("cpu",) if device.type == "cpu" else ("triton",)) if b != chosen]
            what = {"cpu": "the native C++ kernels", "reference": "the pure-PyTorch reference",
                    "triton": "the Triton kernels", "cuda": "the CUDA kernels"}[chosen]
            why = f"{what}, the default for {device.type} tensors" + "".join(
                f"; {b} unavailable: {backends.refusal_reason(op, b, device)}" for b in skipped)
            if device.type == "cuda":
                why += "; cuda is opt-in (CLIPFAST_BACKEND=cuda) until verified on a GPU"
        rows.append((device.type, chosen, why))
    if not torch.cuda.is_available():
        rows.append(("cuda", "-", "no CUDA device visible"))
    return rows


def report() -> str:
    width = max(len(op) for op in backends.OPS) + 2
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
        "What runs here (float32 inputs):",
        f"{'op':<{width}} {'device':<7} {'backend':<10} why",
    ]
    for op in backends.OPS:
        for device, chosen, why in _backend_here(op):
            lines.append(f"{op:<{width}} {device:<7} {chosen:<10} {why}")
    lines += ["", "Every backend:", f"{'op':<{width}} {'backend':<10} {'device':<7} status"]
    for row in backends.capability_table():
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        lines.append(f"{row['op']:<{width}} {row['backend']:<10} {row['device']:<7} {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipfast.info",
        description="Versions, native build status, the backend each clipfast op runs with here and why, and "
                    "every backend's availability. Honours CLIPFAST_BACKEND and TRITON_INTERPRET.")
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
