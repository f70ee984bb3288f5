"""Other positives than the diagonal: ``labels=`` (a target column per row, Inf-CL's convention) and
multi-positive ``group_ids`` (UniCL), on clip_loss, contrastive_cross_entropy and siglip_loss, through
every backend that runs here, against the float64 reference; gradcheck, compile, bad inputs."""

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.contrastive import (clip_loss_reference, multi_positive_loss_reference,
                                            multi_positive_siglip_loss_reference)
from clipfast.testing import assert_close_to_reference

CPU_BACKENDS = backends.available_backends("contrastive", "cpu")
# Unnormalised features and open_clip's largest scale (100): the labels' terms are not helped by unit rows.
SCALE = 100.0
SHAPES = {"small": (23, 23, 16), "large": (300, 300, 64)}
INTERPRETER_SHAPES = {"small": (23, 23, 16)}

CASES = [
    pytest.param(b, shape, dtype, id=f"{b}-{name}-{str(dtype)[6:]}")
    for b in CPU_BACKENDS for name, shape in (INTERPRETER_SHAPES if b == "triton" else SHAPES).items()
    for dtype in (torch.float64, torch.float32) if dtype in backends.DTYPES[b]
]


def _features(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3 / d ** 0.5).to(dtype).requires_grad_()


def _group_ids(n, seed):
    """Ids with repeats (about three pairs per id), in no particular order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, n // 3), (n,), generator=g)


def _scalars(dtype):
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.tensor(SCALE, dtype=scalar_dtype, requires_grad=True),
            torch.tensor(-5.0, dtype=scalar_dtype, requires_grad=True))


def _as64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _check(fused, reference, inputs, dtype):
    loss = fused(*inputs)
    grads = torch.autograd.grad(2.0 * loss, inputs)
    ref_inputs = _as64(inputs)
    ref_loss = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(2.0 * ref_loss, ref_inputs)
    assert_close_to_reference(loss, ref_loss, dtype, "output", "loss")
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == inputs[i].dtype
        assert_close_to_reference(g, ref_g, dtype, "grad", f"grad {i}")


@pytest.mark.parametrize("backend,shape,dtype", CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
def test_clip_loss_group_ids(backend, shape, dtype, smoothing):
    n, _, d = shape
    ids = _group_ids(n, seed=n)
    image, text = _features(n, d, dtype, 1), _features(n, d, dtype, 2)
    scale, _ = _scalars(dtype)
    with clipfast.use_backend(backend):
        _check(lambda i, t, s: clipfast.clip_loss(i, t, s, group_ids=ids, label_smoothing=smoothing),
               lambda i, t, s: multi_positive_loss_reference(i, t, s, ids, ids, label_smoothing=smoothing),
               (image, text, scale), dtype)


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_clip_loss_with_separate_image_and_text_ids(backend, shape, dtype):
    n, _, d = shape
    # Every id in both, in different orders: images and texts of one id are not aligned.
    image_ids = torch.randperm(n, generator=torch.Generator().manual_seed(3)) % (n // 2)
    text_ids = torch.randperm(n, generator=torch.Generator().manual_seed(4)) % (n // 2)
    image, text = _features(n, d, dtype, 1), _features(n, d, dtype, 2)
    scale, _ = _scalars(dtype)
    with clipfast.use_backend(backend):
        _check(lambda i, t, s: clipfast.clip_loss(i, t, s, group_ids=(image_ids, text_ids)),
               lambda i, t, s: multi_positive_loss_reference(i, t, s, image_ids, text_ids),
               (image, text, scale), dtype)


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_clip_loss_labels_permutation(backend, shape, dtype):
    n, _, d = shape
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    image, text = _features(n, d, dtype, 1), _features(n, d, dtype, 2)
    scale, _ = _scalars(dtype)

    def reference(i, t, s):  # a permutation of the texts makes the diagonal loss
        return clip_loss_reference(i, t[labels], s)

    with clipfast.use_backend(backend):
        _check(lambda i, t, s: clipfast.clip_loss(i, t, s, labels=labels), reference, (image, text, scale), dtype)


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_contrastive_cross_entropy_labels_inf_cl_convention(backend, shape, dtype):
    """Any target column per row, repeats allowed: ``F.cross_entropy(s q k^T, labels)``."""
    n, m, d = shape
    queries, keys = _features(n // 2 + 1, d, dtype, 1), _features(m, d, dtype, 2)
    labels = torch.randint(0, m, (queries.shape[0],), generator=torch.Generator().manual_seed(7))
    labels[:2] = labels[2]  # repeated targets
    scale, _ = _scalars(dtype)

    def reference(q, k, s):
        return torch.nn.functional.cross_entropy(s * q @ k.T, labels)

    with clipfast.use_backend(backend):
        _check(lambda q, k, s: clipfast.contrastive_cross_entropy(q, k, s, labels=labels), reference,
               (queries, keys, scale), dtype)


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_contrastive_cross_entropy_group_ids(backend, shape, dtype):
    n, m, d = shape
    queries, keys = _features(n // 2 + 1, d, dtype, 1), _features(m, d, dtype, 2)
    key_ids = _group_ids(m, seed=9)
    query_ids = key_ids[torch.randint(0, m, (queries.shape[0],), generator=torch.Generator().manual_seed(4))]
    scale, _ = _scalars(dtype)
    with clipfast.use_backend(backend):
        _check(lambda q, k, s: clipfast.contrastive_cross_entropy(q, k, s, group_ids=(query_ids, key_ids)),
               lambda q, k, s: multi_positive_loss_reference(q, k, s, query_ids, key_ids, symmetric=False),
               (queries, keys, scale), dtype)


@pytest.mark.parametrize("backend,shape,dtype", CASES)
def test_siglip_group_ids_and_labels(backend, shape, dtype):
    n, m, d = shape
    image, text = _features(n, d, dtype, 1), _features(m, d, dtype, 2)
    scale, bias = torch.tensor(10.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                               requires_grad=True), _scalars(dtype)[1]
    ids = _group_ids(n, seed=11)
    labels = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(12))
    with clipfast.use_backend(backend):
        _check(lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, group_ids=ids),
               lambda i, t, s, b: multi_positive_siglip_loss_reference(i, t, s, b, ids, ids),
               (image, text, scale, bias), dtype)
        _check(lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, labels=labels),
               lambda i, t, s, b: multi_positive_siglip_loss_reference(i, t, s, b, labels, torch.arange(m)),
               (image, text, scale, bias), dtype)


def test_distinct_ids_and_the_identity_labels_are_the_plain_losses():
    image, text = _features(17, 8, torch.float64, 1), _features(17, 8, torch.float64, 2)
    scale, bias = _scalars(torch.float64)
    plain = clipfast.clip_loss(image, text, scale)
    shuffled_ids = torch.randperm(17) + 100
    for other in (clipfast.clip_loss(image, text, scale, group_ids=shuffled_ids),
                  clipfast.clip_loss(image, text, scale, labels=torch.arange(17))):
        torch.testing.assert_close(other, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(clipfast.siglip_loss(image, text, scale, bias, group_ids=shuffled_ids),
                               clipfast.siglip_loss(image, text, scale, bias), rtol=1e-12, atol=1e-12)


def test_gradcheck_multi_positive():
    image, text = _features(7, 5, torch.float64, 1), _features(7, 5, torch.float64, 2)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    assert torch.autograd.gradcheck(
        lambda i, t, s: clipfast.clip_loss(i, t, s, group_ids=ids, label_smoothing=0.1), (image, text, scale))
    assert torch.autograd.gradcheck(
        lambda q, k, s: clipfast.contrastive_cross_entropy(q, k, s, labels=torch.tensor([3, 3, 0])),
        (image[:3], text, scale))
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, group_ids=ids), (image, text, scale, bias))


def test_compiles_without_graph_breaks():
    image, text = _features(12, 8, torch.float32, 1), _features(12, 8, torch.float32, 2)
    scale = torch.tensor(20.0, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 7])

    def fn(i, t, s):
        return clipfast.clip_loss(i, t, s, group_ids=ids) + clipfast.siglip_loss(i, t, s, -2.0, labels=ids)

    explanation = torch._dynamo.explain(fn)(image, text, scale)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(image, text, scale), fn(image, text, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, h in zip(torch.autograd.grad(got, (image, text, scale)), torch.autograd.grad(want, (image, text, scale))):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.arange(5)), ValueError, r"labels must have shape \(6,\)"),
    (dict(labels=torch.arange(6).float()), TypeError, "integer tensor"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError, r"labels must lie in \[0, 6\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, r"labels must lie in \[0, 6\)"),
    (dict(labels=torch.tensor([0, 0, 1, 2, 3, 4])), ValueError, "every row .* needs a positive"),  # text 5 has none
    (dict(group_ids=torch.arange(7)), ValueError, r"group_ids must have shape \(6,\)"),
    (dict(group_ids=torch.ones(6, dtype=torch.bool)), TypeError, "integer tensor"),
    (dict(group_ids=(torch.arange(6), torch.arange(6) + 1)), ValueError, "every row .* needs a positive"),
    (dict(group_ids=[torch.arange(6)]), TypeError, "pair"),
    (dict(group_ids=torch.arange(6), labels=torch.arange(6)), ValueError, "not both"),
], ids=["labels_length", "labels_dtype", "labels_high", "labels_negative", "text_without_positive",
        "ids_length", "ids_dtype", "row_without_positive", "ids_not_a_pair", "both"])
def test_bad_positives_raise(kwargs, error, match):
    image, text = _features(6, 4, torch.float32, 1), _features(6, 4, torch.float32, 2)
    with pytest.raises(error, match=match):
        clipfast.clip_loss(image, text, 10.0, **kwargs)


def test_bad_positives_on_the_other_losses_raise():
    queries, keys = _features(3, 4, torch.float32, 1), _features(6, 4, torch.float32, 2)
    with pytest.raises(ValueError, match="not several"):
        clipfast.contrastive_cross_entropy(queries, keys, 10.0, label_offset=2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one group_ids tensor describes a square batch"):
        clipfast.contrastive_cross_entropy(queries, keys, 10.0, group_ids=torch.arange(3))
    with pytest.raises(ValueError, match="not with label_offset or negative_only"):
        clipfast.siglip_loss(queries, keys, 10.0, -1.0, negative_only=True, labels=torch.tensor([0, 1, 2]))
