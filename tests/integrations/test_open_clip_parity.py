"""clipfast.nn.ClipLoss / SigLipLoss against open_clip 3.3.0's modules: same numbers, same gradients,
same return conventions (the drop-in promise)."""

import pytest
import torch

import clipfast
from clipfast.testing import unit_features

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open-clip-torch is not installed")


def _leaves(n, d, dtype, scale_shape=(), log_scale=2.659, bias=-10.0):
    image = unit_features(n, d, dtype=dtype, seed=5).requires_grad_()
    text = unit_features(n, d, dtype=dtype, seed=6).requires_grad_()
    log_s = torch.full(scale_shape, log_scale, dtype=dtype, requires_grad=True)
    b = torch.full(scale_shape, bias, dtype=dtype, requires_grad=True)
    return image, text, log_s, b


def _step(module, leaves, with_bias):
    image, text, log_s, b = leaves
    args = (image, text, log_s.exp(), b) if with_bias else (image, text, log_s.exp())
    out = module(*args, output_dict=True)
    loss = out["contrastive_loss"]
    return loss, torch.autograd.grad(2.0 * loss, leaves if with_bias else leaves[:3])


CASES = [
    ("ClipLoss", False, {}),
    ("ClipLoss", True, {}),  # open_clip adds logit_bias since 2025-04; the loss is invariant to it
    ("SigLipLoss", True, {}),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scale0d", "scale1"])
@pytest.mark.parametrize("name,with_bias,kwargs", CASES, ids=["clip", "clip_bias", "siglip"])
def test_matches_open_clip(name, with_bias, kwargs, scale_shape, dtype, tol):
    ours_module = getattr(clipfast.nn, name)(**kwargs)
    theirs_module = getattr(open_clip_loss, name)(**kwargs)
    for log_scale in (2.659, 4.605):  # CLIP's initial 1/0.07, and the clamp value 100
        leaves = _leaves(300, 64, dtype, scale_shape, log_scale)
        ours, ours_grads = _step(ours_module, leaves, with_bias)
        theirs, theirs_grads = _step(theirs_module, leaves, with_bias)
        torch.testing.assert_close(ours.to(dtype), theirs, rtol=tol, atol=tol)
        for g, h in zip(ours_grads, theirs_grads):
            assert g.shape == h.shape
            torch.testing.assert_close(g, h, rtol=tol * 10, atol=tol)


def test_return_conventions():
    image, text, log_s, b = _leaves(16, 8, torch.float32)
    loss = clipfast.nn.ClipLoss()(image, text, log_s.exp())
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert set(clipfast.nn.ClipLoss()(image, text, log_s.exp(), output_dict=True)) == {"contrastive_loss"}
    assert set(clipfast.nn.SigLipLoss()(image, text, log_s.exp(), b, output_dict=True)) == {"contrastive_loss"}


def test_constructor_signatures_accept_open_clip_arguments():
    clipfast.nn.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    clipfast.nn.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="bidir")


def test_rank_is_not_read_in_one_process():
    """open_clip accepts any rank with world_size=1 (launchers pass the global rank along)."""
    image, text, log_s, b = _leaves(16, 8, torch.float32)
    for cls in ("ClipLoss", "SigLipLoss"):
        ours, theirs = getattr(clipfast.nn, cls)(rank=1, world_size=1), getattr(open_clip_loss, cls)(rank=1, world_size=1)
        args = (image, text, log_s.exp(), b)
        torch.testing.assert_close(ours(*args).float(), theirs(*args).float(), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="inconsistent"):
        clipfast.nn.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="inconsistent"):
        clipfast.nn.SigLipLoss(world_size=0)


def _public_signature(cls, name):
    import inspect

    return list(inspect.signature(getattr(cls, name)).parameters.values())  # names, kinds, defaults


@pytest.mark.parametrize("cls,methods", [("ClipLoss", ("get_ground_truth", "get_logits")),
                                         ("SigLipLoss", ("get_ground_truth", "get_logits", "_loss"))])
def test_open_clip_methods_have_open_clips_signatures(cls, methods):
    for name in methods:
        assert _public_signature(getattr(clipfast.nn, cls), name) == \
            _public_signature(getattr(open_clip_loss, cls), name), name


@pytest.mark.parametrize("cache_labels", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_methods_match_open_clip(with_bias, cache_labels):
    image, text, log_s, b = _leaves(12, 8, torch.float64)
    ours = clipfast.nn.ClipLoss(cache_labels=cache_labels)
    theirs = open_clip_loss.ClipLoss(cache_labels=cache_labels)
    bias = b if with_bias else None
    for a, c in zip(ours.get_logits(image, text, log_s.exp(), bias), theirs.get_logits(image, text, log_s.exp(), bias)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for _ in range(2):  # the second call reads the cache when cache_labels
        assert torch.equal(ours.get_ground_truth(image.device, 12), theirs.get_ground_truth(image.device, 12))
    assert (ours.prev_num_logits, set(ours.labels)) == (theirs.prev_num_logits, set(theirs.labels))


@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_methods_match_open_clip(with_bias, negative_only):
    image, text, log_s, b = _leaves(12, 8, torch.float64)
    ours, theirs = clipfast.nn.SigLipLoss(), open_clip_loss.SigLipLoss()
    bias = b if with_bias else None
    torch.testing.assert_close(ours.get_logits(image, text, log_s.exp(), bias),
                               theirs.get_logits(image, text, log_s.exp(), bias), rtol=0, atol=0)
    assert torch.equal(ours.get_ground_truth(image.device, image.dtype, 12, negative_only=negative_only),
                       theirs.get_ground_truth(image.device, image.dtype, 12, negative_only=negative_only))
    ours_loss = ours._loss(image, text, log_s.exp(), bias, negative_only=negative_only)
    theirs_loss = theirs._loss(image, text, log_s.exp(), bias, negative_only=negative_only)
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-10, atol=1e-10)
    ours_grads = torch.autograd.grad(ours_loss, (image, text, log_s))
    theirs_grads = torch.autograd.grad(theirs_loss, (image, text, log_s))
    for g, h in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-10)


def _caption_batch(batch, length, vocab, dtype, pad_id):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, -2:] = pad_id  # padded tail: ignored by the caption loss
    return logits, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("weights,pad_id", [((2.0, 1.0), 0), ((1.5, 0.25), 3), ((1.0, 0.0), 0)],
                         ids=["open_clip_defaults", "weighted_pad3", "no_contrastive"])
def test_coca_loss_matches_open_clip(weights, pad_id, dtype, tol):
    caption_weight, clip_weight = weights
    ours_module = clipfast.nn.CoCaLoss(caption_weight, clip_weight, pad_id=pad_id)
    theirs_module = open_clip_loss.CoCaLoss(caption_weight, clip_weight, pad_id=pad_id)
    image, text, log_s, _ = _leaves(64, 32, dtype)
    logits, labels = _caption_batch(64, 9, 50, dtype, pad_id)
    leaves = (image, text, log_s, logits)
    results = []
    for module in (ours_module, theirs_module):
        out = module(image, text, logits, labels, log_s.exp(), output_dict=True)
        assert set(out) == {"contrastive_loss", "caption_loss"}
        total = out["contrastive_loss"] + out["caption_loss"]
        grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
        results.append((out, grads))
    (ours, ours_grads), (theirs, theirs_grads) = results
    for key in ("contrastive_loss", "caption_loss"):
        assert ours[key].dtype == theirs[key].dtype or key == "contrastive_loss", key
        torch.testing.assert_close(ours[key].to(theirs[key].dtype), theirs[key], rtol=tol, atol=tol)
    for g, h in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(g, h, rtol=tol * 10, atol=tol)
    if clip_weight == 0:  # open_clip's int64 zero, not a float
        assert ours["contrastive_loss"].dtype == torch.int64 and int(ours["contrastive_loss"]) == 0
    pair = ours_module(image, text, logits, labels, log_s.exp())
    assert isinstance(pair, tuple) and len(pair) == 2


def test_coca_loss_has_open_clips_signatures():
    """Same parameter names, kinds and defaults in the same order (clipfast adds dist_impl at the end)."""
    def shape(cls, name):
        return [(p.name, p.kind, p.default) for p in _public_signature(cls, name)]

    for name in ("__init__", "forward"):
        theirs = shape(open_clip_loss.CoCaLoss, name)
        assert shape(clipfast.nn.CoCaLoss, name)[:len(theirs)] == theirs, name
