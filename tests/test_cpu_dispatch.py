"""The CPU kernels' per-level copies (csrc/cpu/vec/, clipfast/cpu_kernels.h): each level this machine can
run gives the same results within the fp32 tolerance, the level follows ATen's choice, and a level the CPU
lacks is never chosen even when ATEN_CPU_CAPABILITY asks for it."""

import os
import subprocess
import sys

import pytest
import torch

from clipfast import backends
from clipfast.bench import report

pytestmark = pytest.mark.skipif(not backends.native_available(), reason=f"native kernels unavailable: "
                                f"{backends.native_load_error}")

WORKER = r"""
import sys, torch, clipfast
from clipfast.bench import report
torch.manual_seed(0)
img = torch.nn.functional.normalize(torch.randn(301, 67), dim=1).requires_grad_()
txt = torch.nn.functional.normalize(torch.randn(301, 67), dim=1).requires_grad_()
s, b = torch.tensor(14.3, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
out = {"level": report.machine()["isa"]}
with clipfast.use_backend("cpu"):
    for name, loss in (("clip", clipfast.clip_loss(img, txt, s)), ("siglip", clipfast.siglip_loss(img, txt, s, b))):
        out[name] = [loss.detach(), *torch.autograd.grad(loss, (img, txt, s))]
    tokens = torch.randn(3, 37, 70)
    out["medoids"] = [clipfast.token_medoids(tokens, 9, metric=m)[1] for m in ("euclidean", "cosine")]
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, capability: str) -> dict:
    path = tmp_path / f"{capability}.pt"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", WORKER, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


def test_levels_agree_and_follow_aten(tmp_path):
    native = torch.backends.cpu.get_cpu_capability()
    baseline = _run(tmp_path, "default")
    assert baseline["level"] == "DEFAULT"
    levels = [baseline]
    if native != "DEFAULT":
        best = _run(tmp_path, native.lower())
        assert best["level"] == report.machine()["isa"] == native
        levels.append(best)
    for other in levels[1:]:
        for loss in ("clip", "siglip"):
            for got, want in zip(other[loss], baseline[loss]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(other["medoids"], baseline["medoids"]):
            assert torch.equal(got, want)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX2", reason="needs an AVX2 CPU without AVX-512")
def test_missing_level_is_never_chosen(tmp_path):
    assert _run(tmp_path, "avx512")["level"] == "AVX2"
