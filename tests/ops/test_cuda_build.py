"""The CUDA kernels of every op without a GPU: they compile for sm_80/sm_90 with no register spills (what
`make check-cuda` runs), and the extension carries their CUDA dispatch entries when built by a CUDA torch."""

import os
import shutil
import subprocess

import pytest
import torch

from clipfast import backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = next((p for p in ("/usr/local/cuda/bin/nvcc", shutil.which("nvcc")) if p and os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources cannot be compile-checked here")
def test_make_check_cuda_passes():
    result = subprocess.run(["make", "-s", "check-cuda", f"NVCC={NVCC}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout + result.stderr
    assert report.count("0 bytes spill stores, 0 bytes spill loads") >= 2 * 2 * 3 * 2, report[-2000:]


@pytest.mark.skipif(not (torch.version.cuda and NVCC and backends.native_available()),
                    reason="the extension is built with CUDA kernels only by a CUDA torch with nvcc present")
def test_extension_registers_cuda_kernels():
    for names in backends.native_op_names().values():
        for name in names:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"clipfast_C::{name}", "CUDA"), name
