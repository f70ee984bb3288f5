"""The kernel-covariance core on a GPU: Triton (default) and the opt-in CUDA kernels against the float64
reference, forward and backward. Runs in `make gpu-check`; skips elsewhere."""

import os

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.ops.schur_covariance import kernel_covariance
from clipfast.reference.schur_covariance import COVARIANCES, kernel_covariance_reference
from clipfast.testing import assert_close_to_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in make gpu-check)"),
]

GPU_BACKENDS = [b for b in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(",")
                if torch.cuda.is_available()
                and backends.refusal_reason("schur_covariance", b, torch.device("cuda")) is None]


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("shape", [(1, 8, 4), (3001, 512, 300), (20000, 512, 1250)], ids=["tiny", "odd", "large"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_matches_float64_reference(backend, shape, covariance):
    n, d, m = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(n, d, generator=g).cuda().requires_grad_()
    image = (0.6 * text.detach() + 0.8 * torch.randn(n, d, generator=g).cuda()).requires_grad_()
    omegas = (torch.randn(d, m, generator=g) / 3.5).cuda() if covariance == "rff" else None
    with clipfast.use_backend(backend):
        blocks = kernel_covariance(image, text, covariance, omegas)
    upstream = [torch.randn(b.shape, device="cuda", dtype=torch.float64) for b in blocks]
    grads = torch.autograd.grad(blocks, (image, text), [u.float() for u in upstream])
    x64, t64 = image.detach().double().requires_grad_(), text.detach().double().requires_grad_()
    ref = kernel_covariance_reference(x64, t64, covariance, None if omegas is None else omegas.double())
    for got, want in zip(blocks, ref):
        assert_close_to_reference(got, want, torch.float32, "output", covariance)
    for got, want in zip(grads, torch.autograd.grad(ref, (x64, t64), upstream)):
        assert_close_to_reference(got, want, torch.float32, "grad", covariance)
