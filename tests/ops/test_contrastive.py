"""The fused contrastive losses through every backend that runs here, against the float64 reference.

Backends come from the capability table: on a CPU machine `reference`, `cpu` (native library) and
`triton` (interpreter, small shapes only: it is ~1000x slower than eager).
"""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference import clip_loss_reference, siglip_loss_reference
from clipfast.testing import assert_close_to_reference, assert_within_low_precision_bound, unit_features

CPU_BACKENDS = backends.available_backends("contrastive", "cpu")
SHAPES = {  # id -> (N, M, D)
    "tiny": (1, 1, 8),
    "odd": (257, 257, 129),
    "realistic": (2048, 2048, 512),
}
INTERPRETER_SHAPES = {"tiny": (1, 1, 8), "odd": (37, 37, 19)}


def _shapes(backend):
    return INTERPRETER_SHAPES if backend == "triton" else SHAPES


CASES = [
    pytest.param(b, shape, dtype, id=f"{b}-{name}-{str(dtype)[6:]}")
    for b in CPU_BACKENDS for name, shape in _shapes(b).items()
    for dtype in (torch.float64, torch.float32) if dtype in backends.DTYPES[b]
]


def _inputs(n, m, d, dtype, scale=14.3, bias=-3.0, seed=0):
    image = unit_features(n, d, dtype=dtype, seed=seed).requires_grad_()
    text = unit_features(m, d, dtype=dtype, seed=seed + 1).requires_grad_()
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logit_scale = torch.tensor(scale, dtype=scalar_dtype, requires_grad=True)
    logit_bias = torch.tensor(bias, dtype=scalar_dtype, requires_grad=True)
    return image, text, logit_scale, logit_bias


def _as64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


LOSSES = {
    "clip": (lambda i, t, s, b: clipfast.clip_loss(i, t, s, b),
             lambda i, t, s, b: clip_loss_reference(i, t, s, b)),
    "clip_smoothed": (lambda i, t, s, b: clipfast.clip_loss(i, t, s, b, label_smoothing=0.1),
                      lambda i, t, s, b: clip_loss_reference(i, t, s, b, label_smoothing=0.1)),
    "siglip": (clipfast.siglip_loss, siglip_loss_reference),
}


def _loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    return loss, torch.autograd.grad(3.0 * loss, inputs)  # upstream gradient 3: the scaling must be exact


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_matches_float64_reference(backend, shape, dtype, loss_name):
    n, m, d = shape
    fused, reference = LOSSES[loss_name]
    inputs = _inputs(n, m, d, dtype)
    with clipfast.use_backend(backend):
        loss, grads = _loss_and_grads(fused, inputs)
    ref_loss, ref_grads = _loss_and_grads(reference, _as64(inputs))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(loss, ref_loss, dtype, "output", "loss")
    for name, g, ref_g, x in zip(("image", "text", "scale", "bias"), grads, ref_grads, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close_to_reference(g, ref_g, dtype, "grad", f"d{name}")


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_within_twice_pytorch_error(backend, dtype, loss_name):
    n, m, d = INTERPRETER_SHAPES["odd"] if backend == "triton" else (300, 300, 64)
    fused, reference = LOSSES[loss_name]
    inputs = _inputs(n, m, d, dtype, scale=20.0)
    with clipfast.use_backend(backend):
        loss, grads = _loss_and_grads(fused, inputs)
    plain_loss, plain_grads = _loss_and_grads(reference, inputs)  # plain PyTorch in the same dtype
    ref_loss, ref_grads = _loss_and_grads(reference, _as64(inputs))
    assert loss.dtype == torch.float32
    assert_within_low_precision_bound(loss, plain_loss, ref_loss, dtype, "loss")
    for name, g, p, r in zip(("image", "text"), grads, plain_grads, ref_grads):
        assert g.dtype == dtype
        assert_within_low_precision_bound(g, p, r, dtype, f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rectangular_blocks_with_label_offset(backend):
    """The building blocks of the distributed losses: rows against a larger key set, labels offset."""
    n, m, d, offset = (5, 17, 8, 9) if backend == "triton" else (70, 300, 33, 130)
    dtype = torch.float64 if torch.float64 in backends.DTYPES[backend] else torch.float32
    q, k, s, b = [t.detach().to(dtype).requires_grad_() for t in _inputs(n, m, d, dtype)]
    with clipfast.use_backend(backend):
        ce = clipfast.contrastive_cross_entropy(q, k, s, label_offset=offset, label_smoothing=0.2)
        sig = clipfast.siglip_loss(q, k, s, b, label_offset=offset)
        neg = clipfast.siglip_loss(q, k, s, b, negative_only=True)
    for fused, ref in (
        (ce, clip_loss_reference(q, k, s, label_offset=offset, symmetric=False, label_smoothing=0.2)),
        (sig, siglip_loss_reference(q, k, s, b, label_offset=offset)),
        (neg, siglip_loss_reference(q, k, s, b, negative_only=True)),
    ):
        assert_close_to_reference(fused, ref, dtype, "output", "loss")
        for g, ref_g in zip(torch.autograd.grad(fused, (q, k, s)), torch.autograd.grad(ref, (q, k, s))):
            assert_close_to_reference(g, ref_g, dtype, "grad", "grad")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    inputs = _as64(_inputs(9, 9, 5, torch.float64, scale=2.0))
    with clipfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda i, t, s, b: clipfast.clip_loss(i, t, s, b, label_smoothing=0.1),
                                        inputs)
        assert torch.autograd.gradcheck(clipfast.siglip_loss, inputs)
        q, k, s, _ = _as64(_inputs(5, 12, 5, torch.float64, scale=2.0))
        assert torch.autograd.gradcheck(
            lambda q, k, s: clipfast.contrastive_cross_entropy(q, k, s, label_offset=4, label_smoothing=0.3),
            (q, k, s))


def test_large_logits_are_stable():
    """s = 100 with identical towers: logits up to 100 (exp overflows fp32 above 88.7 without a shift)."""
    x = unit_features(64, 32)
    for backend in CPU_BACKENDS:
        with clipfast.use_backend(backend):
            loss = clipfast.clip_loss(x, x.clone(), torch.tensor(100.0))
            sig = clipfast.siglip_loss(x, x.clone(), torch.tensor(100.0), torch.tensor(-10.0))
        ref = clip_loss_reference(x.double(), x.double(), torch.tensor(100.0))
        assert torch.isfinite(loss) and torch.isfinite(sig), backend
        assert_close_to_reference(loss, ref, torch.float32, "output", f"{backend} loss")


def test_non_contiguous_and_expanded_inputs_are_handled():
    base = unit_features(64, 40)
    image = base.T.contiguous().T  # column-major view
    text = unit_features(128, 40)[::2]  # strided rows
    expanded = unit_features(1, 40).expand(64, 40)  # stride 0
    s = torch.tensor(10.0)
    for i, t in ((image, text), (expanded, text), (image, expanded)):
        assert not (i.is_contiguous() and t.is_contiguous())
        ref = clip_loss_reference(i.double(), t.double(), s)
        assert_close_to_reference(clipfast.clip_loss(i, t, s), ref, torch.float32, "output", "loss")


def test_logit_scale_shapes_and_bias_gradient():
    """open_clip passes a 0-d or [1] scale; gradients keep the shape; the InfoNCE bias gradient is 0."""
    image, text, _, _ = _inputs(16, 16, 8, torch.float32)
    for shape in ((), (1,)):
        s = torch.full(shape, 5.0, requires_grad=True)
        b = torch.full(shape, -1.0, requires_grad=True)
        loss = clipfast.clip_loss(image, text, s, b)
        gs, gb = torch.autograd.grad(loss, (s, b))
        assert gs.shape == shape and gb.shape == shape
        assert torch.equal(gb, torch.zeros(shape))
        loss = clipfast.siglip_loss(image, text, s, b)
        assert all(g.shape == shape for g in torch.autograd.grad(loss, (s, b)))


def test_nan_features_propagate():
    image, text, s, b = _inputs(32, 32, 8, torch.float32)
    image = image.detach().clone()
    image[3, 2] = float("nan")
    for backend in CPU_BACKENDS:
        with clipfast.use_backend(backend):
            assert torch.isnan(clipfast.clip_loss(image, text, s)), backend
            assert torch.isnan(clipfast.siglip_loss(image, text, s, b)), backend


def test_cpu_kernel_is_deterministic():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"native CPU kernels unavailable: {backends.native_load_error}")
    image, text, s, b = _inputs(700, 700, 96, torch.float32)
    runs = []
    for _ in range(3):
        with clipfast.use_backend("cpu"):
            loss = clipfast.clip_loss(image, text, s)
            runs.append((loss, *torch.autograd.grad(loss, (image, text, s))))
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))


def test_native_kernels_refuse_malformed_arguments():
    """Past the Python layer's validation the native kernels still refuse what would read out of bounds: a
    feature pair as a user error (clipfast.distributed.ring_clip_loss reaches them without functional.py's
    feature checks), the one-value scale as an internal invariant."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"native CPU kernels unavailable: {backends.native_load_error}")
    x, y = unit_features(4, 8, seed=0), unit_features(5, 8, seed=1)
    with pytest.raises(RuntimeError, match="contrastive_lse: x and y dtypes differ"):
        torch.ops.clipfast_C.contrastive_lse(x, y.double(), torch.tensor(2.0), True)
    with pytest.raises(RuntimeError, match="(?s)INTERNAL ASSERT FAILED.*contrastive_lse: scale must hold one value"):
        torch.ops.clipfast_C.contrastive_lse(x, y, torch.ones(0), True)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_autocast_multiplies_fp32_features_in_the_autocast_dtype(loss_name):
    """As open_clip's matmul under autocast: same loss as bf16 features, fp32 gradients for fp32 leaves."""
    fused, _ = LOSSES[loss_name]
    inputs = _inputs(64, 64, 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(*inputs)
    grads = torch.autograd.grad(loss, inputs[:2])
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs[:2]]
    loss_low = fused(*low, *inputs[2:])
    assert loss.dtype == torch.float32 and torch.equal(loss, loss_low)
    for g, g_low in zip(grads, torch.autograd.grad(loss_low, low)):
        assert g.dtype == torch.float32 and torch.equal(g, g_low.float())
