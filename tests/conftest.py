"""Test set-up: the Triton interpreter on machines without a GPU, and fixed seeds."""

import os

import torch

# Must happen before any @triton.jit decorator runs, i.e. before clipfast.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from clipfast.triton_kernels.interpreter_patches import patch_bf16_dot
        except ImportError:  # triton not installed: the Triton tests skip with a reason
            return
        patch_bf16_dot()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
