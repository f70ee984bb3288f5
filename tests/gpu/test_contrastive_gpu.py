"""The contrastive op on a GPU: Triton (default) and the opt-in CUDA kernels against the float64
reference, large shapes, 16-bit inputs, torch.compile. Runs in `make gpu-check`; skips elsewhere."""

import os

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference import clip_loss_reference, siglip_loss_reference
from clipfast.testing import assert_close_to_reference, assert_within_low_precision_bound, unit_features

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in make gpu-check)"),
]

# gpu-check runs each backend in its own process: a faulting kernel must not poison the other's context.
GPU_BACKENDS = [b for b in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(",")
                if torch.cuda.is_available() and backends.refusal_reason("contrastive", b, torch.device("cuda")) is None]
SHAPES = [(1, 1, 8), (257, 257, 129), (4096, 4096, 512), (1000, 1000, 1152)]


def _inputs(n, d, dtype, scale=14.3, bias=-3.0):
    image = unit_features(n, d, dtype=dtype, seed=0, device="cuda").requires_grad_()
    text = unit_features(n, d, dtype=dtype, seed=1, device="cuda").requires_grad_()
    s = torch.tensor(scale, device="cuda", requires_grad=True)
    b = torch.tensor(bias, device="cuda", requires_grad=True)
    return image, text, s, b


LOSSES = {"clip": (clipfast.clip_loss, clip_loss_reference), "siglip": (clipfast.siglip_loss, siglip_loss_reference)}


def _run(fn, inputs):
    loss = fn(*inputs)
    return loss, torch.autograd.grad(loss, inputs[:3])


def test_gpu_backends_present():
    for backend in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(","):
        assert backend in GPU_BACKENDS, backends.refusal_reason("contrastive", backend, torch.device("cuda"))


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp32_matches_float64_reference(backend, shape, loss_name):
    n, _, d = shape
    fused, reference = LOSSES[loss_name]
    inputs = _inputs(n, d, torch.float32)
    with clipfast.use_backend(backend):
        loss, grads = _run(fused, inputs)
    ref_loss, ref_grads = _run(reference, [t.detach().double().requires_grad_() for t in inputs])
    assert_close_to_reference(loss, ref_loss, torch.float32, "output", "loss")
    for g, r in zip(grads, ref_grads):
        assert_close_to_reference(g, r, torch.float32, "grad", "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_low_precision(backend, loss_name, dtype):
    fused, reference = LOSSES[loss_name]
    inputs = _inputs(2048, 512, dtype, scale=100.0)
    with clipfast.use_backend(backend):
        loss, grads = _run(fused, inputs)
    plain_loss, plain_grads = _run(reference, inputs)
    ref_loss, ref_grads = _run(reference, [t.detach().double().requires_grad_() for t in inputs])
    assert_within_low_precision_bound(loss, plain_loss, ref_loss, dtype, "loss")
    for g, p, r in zip(grads[:2], plain_grads[:2], ref_grads[:2]):
        assert_within_low_precision_bound(g, p, r, dtype, "grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backends_agree_with_cpu_kernel(backend):
    inputs = _inputs(3000, 768, torch.float32)
    with clipfast.use_backend(backend):
        gpu_loss, gpu_grads = _run(clipfast.clip_loss, inputs)
    cpu_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    cpu_loss, cpu_grads = _run(clipfast.clip_loss, cpu_inputs)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-5)
    for g, c in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="the default GPU backend is covered with triton")
def test_compile_on_gpu():
    inputs = _inputs(512, 256, torch.float32)
    fn = lambda i, t, s, b: clipfast.clip_loss(i, t, s) + clipfast.siglip_loss(i, t, s, b)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(_run(compiled, inputs)[1], _run(fn, inputs)[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="the default GPU backend is covered with triton")
def test_no_n_by_n_allocation_on_gpu():
    inputs = _inputs(32768, 512, torch.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _run(clipfast.clip_loss, inputs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 512 * 2**20, f"{extra / 2**20:.0f} MiB extra (an N x N fp32 buffer is 4096 MiB)"
