"""Distillation (open_clip's DistillClipLoss), fused: clip_distill_loss / distill_cross_entropy through every
backend that runs here against the float64 reference, clipfast.nn.DistillClipLoss against open_clip's own
class, gradcheck, compile, bad inputs. (2 and 4 gloo ranks: tests/test_distributed.py; opcheck:
tests/ops/test_registration.py.)"""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.contrastive import distill_loss_reference
from clipfast.testing import assert_close_to_reference

CPU_BACKENDS = backends.available_backends("contrastive", "cpu")
SHAPES = {"small": (19, 19, 16, 24), "large": (300, 300, 64, 96)}  # (N, M, D, D_teacher)
INTERPRETER_SHAPES = {"small": (19, 19, 16, 24)}
CASES = [
    pytest.param(b, shape, dtype, id=f"{b}-{name}-{str(dtype)[6:]}")
    for b in CPU_BACKENDS for name, shape in (INTERPRETER_SHAPES if b == "triton" else SHAPES).items()
    for dtype in (torch.float64, torch.float32) if dtype in backends.DTYPES[b]
]


def _features(n, d, dtype, seed, requires_grad=True):
    """Unnormalised features: with scale 100 the logits span tens of units."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3 / d ** 0.5).to(dtype).requires_grad_(requires_grad)


def _inputs(n, m, d, d_teacher, dtype):
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return ((_features(n, d, dtype, 1), _features(m, d, dtype, 2), torch.tensor(100.0, dtype=scalar_dtype, requires_grad=True)),
            (_features(n, d_teacher, dtype, 3, False), _features(m, d_teacher, dtype, 4, False),
             torch.tensor(60.0, dtype=scalar_dtype)))


def _losses_and_grads(fn, student, teacher):
    contrastive, distill = fn(*student, *teacher)
    # Distinct upstream weights: the shared backward must keep the two losses' gradients apart.
    grads = torch.autograd.grad(1.5 * contrastive + 0.25 * distill, student)
    return (contrastive, distill), grads


def _as64(tensors, requires_grad=True):
    return [t.detach().double().requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("backend,shape,dtype", CASES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["clip_distill_loss", "distill_cross_entropy"])
def test_matches_float64_reference(backend, shape, dtype, symmetric):
    n, m, d, d_teacher = shape
    if not symmetric:
        n = n // 2 + 1
    offset = 0 if symmetric else m - n - 1
    student, teacher = _inputs(n, m, d, d_teacher, dtype)
    if symmetric:
        fused = clipfast.clip_distill_loss
    else:
        def fused(*args):
            return clipfast.distill_cross_entropy(*args, label_offset=offset)
    with clipfast.use_backend(backend):
        losses, grads = _losses_and_grads(fused, student, teacher)

    def reference(*args):
        return distill_loss_reference(*args, label_offset=offset, symmetric=symmetric)

    student64 = _as64(student)
    ref_losses, ref_grads = _losses_and_grads(reference, student64, _as64(teacher, False))
    for name, got, want in zip(("contrastive", "distill"), losses, ref_losses):
        assert_close_to_reference(got, want, dtype, "output", name)
    for name, g, want, x in zip(("image", "text", "scale"), grads, ref_grads, student):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close_to_reference(g, want, dtype, "grad", f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_matches_open_clip(dtype):
    open_clip_loss = pytest.importorskip("open_clip.loss", reason="open-clip-torch is not installed")
    student, teacher = _inputs(64, 64, 32, 48, dtype)
    results = []
    for module in (clipfast.nn.DistillClipLoss(), open_clip_loss.DistillClipLoss()):
        out = module(*student, *teacher, output_dict=True)
        assert set(out) == {"contrastive_loss", "distill_loss"}
        grads = torch.autograd.grad(out["contrastive_loss"] + 2.0 * out["distill_loss"], student)
        results.append((out["contrastive_loss"], out["distill_loss"], *grads))
    tolerance = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tolerance)
    ours = clipfast.nn.DistillClipLoss()(*student, *teacher)
    assert isinstance(ours, tuple) and len(ours) == 2


def test_module_signature_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss", reason="open-clip-torch is not installed")
    import inspect

    for method in ("__init__", "forward", "dist_loss"):
        ours = inspect.signature(getattr(clipfast.nn.DistillClipLoss, method))
        theirs = inspect.signature(getattr(open_clip_loss.DistillClipLoss, method))
        theirs_names = list(theirs.parameters)
        assert list(ours.parameters)[:len(theirs_names)] == theirs_names, method


def test_gradcheck():
    student, teacher = _inputs(6, 6, 4, 5, torch.float64)
    student = (student[0], student[1], torch.tensor(3.0, dtype=torch.float64, requires_grad=True))
    teacher = (teacher[0], teacher[1], torch.tensor(2.0, dtype=torch.float64))

    def both(i, t, s):
        contrastive, distill = clipfast.clip_distill_loss(i, t, s, *teacher)
        return contrastive, distill

    assert torch.autograd.gradcheck(both, student)
    assert torch.autograd.gradcheck(
        lambda q, k, s: clipfast.distill_cross_entropy(q, k, s, teacher[0][:3], teacher[1], teacher[2], label_offset=2),
        (student[0][:3], student[1], student[2]))


def test_compiles_without_graph_breaks():
    student, teacher = _inputs(12, 12, 8, 10, torch.float32)
    module = clipfast.nn.DistillClipLoss()

    def fn(i, t, s):
        contrastive, distill = module(i, t, s, *teacher)
        return contrastive + distill

    explanation = torch._dynamo.explain(fn)(*student)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(*student), fn(*student)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, h in zip(torch.autograd.grad(got, student), torch.autograd.grad(want, student)):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_bad_inputs_raise():
    student, teacher = _inputs(6, 6, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        clipfast.clip_distill_loss(*student, teacher[0].requires_grad_(), teacher[1], teacher[2])
    teacher[0].requires_grad_(False)
    with pytest.raises(ValueError, match="one row per student row"):
        clipfast.clip_distill_loss(*student, teacher[0][:5], teacher[1], teacher[2])
    with pytest.raises(ValueError, match="feature dimensions differ"):
        clipfast.clip_distill_loss(*student, teacher[0], teacher[1][:, :3], teacher[2])
    with pytest.raises(ValueError, match="frozen"):
        clipfast.clip_distill_loss(*student, teacher[0], teacher[1], torch.tensor(2.0, requires_grad=True))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        clipfast.clip_distill_loss(*student, teacher[0], teacher[1], float("nan"))
    with pytest.raises(ValueError, match="dist_impl=None"):
        clipfast.nn.DistillClipLoss(dist_impl="ring")


def test_teacher_of_another_dtype_is_cast_to_the_students():
    student, teacher = _inputs(8, 8, 4, 6, torch.float32)
    as_double = (teacher[0].double(), teacher[1].double(), teacher[2])
    for got, want in zip(clipfast.clip_distill_loss(*student, *as_double), clipfast.clip_distill_loss(*student, *teacher)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
