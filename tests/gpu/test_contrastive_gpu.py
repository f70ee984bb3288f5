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
SHAPES = [(1, 1, 8), (257, 257, 129), (4096, 4096, 512), (1000, 1000, 1152), (999, 999, 1280)]


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


@pytest.fixture
def tf32_matmul():
    """fp32 matmuls in tf32 for the test (PyTorch's setting, which the Triton kernels follow)."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tf32_within_documented_bound(backend, loss_name, tf32_matmul):
    """tf32 truncates each operand to 10 mantissa bits: a logit of unit-norm features moves by at most
    delta = 2^-9 s, each LSE / softplus term by at most delta, the loss (a mean of LSE minus positive
    logit, or of softplus terms) by at most 2 delta. Gradients: G moves by a factor exp(+-2 delta) and
    the second product truncates once more: element-wise s (expm1(2 delta) + 2^-9) (|G| @ |B|), as in
    tests/ops/test_contrastive_triton.py."""
    fused, reference = LOSSES[loss_name]
    scale = 14.3
    inputs = _inputs(2048, 512, torch.float32, scale=scale)
    with clipfast.use_backend(backend):
        loss, grads = _run(fused, inputs)
    ref_loss, ref_grads = _run(reference, [t.detach().double().requires_grad_() for t in inputs])
    delta = 2.0**-9 * scale
    n = inputs[0].shape[0]
    a, b = (t.detach().double() for t in inputs[:2])
    logits = scale * a @ b.T
    if loss_name == "clip":  # dL/dS, without the label term (exact in every precision)
        g = (torch.softmax(logits, 1) + torch.softmax(logits, 0)) / (2 * n)
        loss_bound = 2 * delta  # LSE and positive logit, each within delta
    else:  # each softplus term moves by at most sigmoid * delta; the positives by delta
        g = torch.sigmoid(logits + inputs[3].item()) / n
        loss_bound = delta * (g.sum().item() + 1)
    assert abs(loss.double().item() - ref_loss.item()) <= loss_bound
    rel = torch.tensor(2 * delta).expm1().item() + 2.0**-9
    for grad, ref, bound in ((grads[0], ref_grads[0], scale * rel * (g @ b.abs())),
                             (grads[1], ref_grads[1], scale * rel * (g.T @ a.abs()))):
        assert ((grad.double() - ref).abs() <= bound + 1e-6 * ref.abs().max()).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_deterministic(backend):
    inputs = _inputs(3000, 768, torch.bfloat16)
    with clipfast.use_backend(backend):
        first = _run(clipfast.clip_loss, inputs)
        second = _run(clipfast.clip_loss, inputs)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(257, 129, 200), (2048, 512, 768)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_distillation_and_multi_positive_match_float64_reference(backend, shape):
    """The gradient kernel's value operands (a teacher of width D_t, the student's features of width D) and
    the group-label epilogue, on the GPU kernels."""
    from clipfast.reference.contrastive import distill_loss_reference, multi_positive_loss_reference

    n, d, d_teacher = shape
    image, text, s, _ = _inputs(n, d, torch.float32)
    teacher = (unit_features(n, d_teacher, seed=5, device="cuda"), unit_features(n, d_teacher, seed=6, device="cuda"),
               torch.tensor(40.0, device="cuda"))
    ids = torch.randint(0, max(1, n // 4), (n,), generator=torch.Generator().manual_seed(0)).cuda()
    student64 = [t.detach().double().requires_grad_() for t in (image, text, s)]
    teacher64 = [t.double() for t in teacher]
    with clipfast.use_backend(backend):
        contrastive, distill = clipfast.clip_distill_loss(image, text, s, *teacher)
        grads = torch.autograd.grad(contrastive + 0.5 * distill, (image, text, s))
        multi = clipfast.clip_loss(image, text, s, group_ids=ids)
        multi_grads = torch.autograd.grad(multi, (image, text, s))
    ref_contrastive, ref_distill = distill_loss_reference(*student64, *teacher64)
    ref_grads = torch.autograd.grad(ref_contrastive + 0.5 * ref_distill, student64)
    ref_multi = multi_positive_loss_reference(*student64, ids, ids)
    ref_multi_grads = torch.autograd.grad(ref_multi, student64)
    for got, want in ((contrastive, ref_contrastive), (distill, ref_distill), (multi, ref_multi)):
        assert_close_to_reference(got, want, torch.float32, "output", "loss")
    for got, want in zip((*grads, *multi_grads), (*ref_grads, *ref_multi_grads)):
        assert_close_to_reference(got, want, torch.float32, "grad", "grad")
