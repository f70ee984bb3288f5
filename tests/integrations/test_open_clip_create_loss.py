"""clipfast.integrations.open_clip.create_loss against open_clip 3.3.0's create_loss: same choice of
loss, same fields forwarded, same numbers and gradients (world_size=1), clear errors for the rest."""

import argparse

import pytest
import torch

import clipfast
from clipfast.integrations.open_clip import create_loss
from clipfast.testing import unit_features

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is not installed")


def _args(**overrides):
    """open_clip_train's namespace after parse_args() and main()'s set-up (args.distill is derived there)."""
    fields = dict(model="ViT-B-32", local_loss=False, gather_with_grad=False, rank=0, world_size=1, horovod=False,
                  distill=False, siglip=False, loss_dist_impl=None, coca_caption_loss_weight=2.0,
                  coca_contrastive_loss_weight=1.0)
    fields.update(overrides)
    return argparse.Namespace(**fields)


@pytest.mark.parametrize("overrides,cls,attributes", [
    ({}, clipfast.nn.ClipLoss,
     dict(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)),
    (dict(local_loss=True, gather_with_grad=True), clipfast.nn.ClipLoss,
     dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)),
    (dict(siglip=True), clipfast.nn.SigLipLoss, dict(rank=0, world_size=1, dist_impl="bidir")),
    (dict(siglip=True, loss_dist_impl="gather"), clipfast.nn.SigLipLoss,
     dict(rank=0, world_size=1, dist_impl="gather")),
    (dict(model="coca_ViT-B-32", local_loss=True), clipfast.nn.CoCaLoss,
     dict(caption_loss_weight=2.0, clip_loss_weight=1.0, local_loss=True, cache_labels=True, rank=0, world_size=1)),
    (dict(model="CoCa-ViT-L-14", siglip=True), clipfast.nn.CoCaLoss,  # open_clip's order: CoCa before SigLIP
     dict(caption_loss_weight=2.0, clip_loss_weight=1.0)),
    (dict(distill=True, local_loss=True), clipfast.nn.DistillClipLoss,
     dict(local_loss=True, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)),
    (dict(distill=True, siglip=True, model="coca_ViT-B-32"), clipfast.nn.DistillClipLoss,  # distill first
     dict(local_loss=False)),
], ids=["clip", "clip_local_gather", "siglip", "siglip_gather", "coca", "coca_before_siglip", "distill",
        "distill_before_coca_and_siglip"])
def test_builds_the_module_with_the_fields(overrides, cls, attributes):
    loss = create_loss(_args(**overrides))
    assert type(loss) is cls
    assert {name: getattr(loss, name) for name in attributes} == attributes


@pytest.mark.parametrize("overrides,cls_name,kwargs", [
    ({}, "ClipLoss", dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=2, world_size=4,
                          use_horovod=False)),
    (dict(siglip=True), "SigLipLoss", dict(rank=2, world_size=4, dist_impl="shift")),
], ids=["clip", "siglip"])
def test_forwards_multi_process_fields_as_keywords(monkeypatch, overrides, cls_name, kwargs):
    """rank/world_size/dist_impl reach the constructor unchanged (recorded, whatever world sizes the
    modules support); ClipLoss gets no dist_impl, as in open_clip."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return "built"

    monkeypatch.setattr(clipfast.nn, cls_name, record)
    args = _args(local_loss=True, gather_with_grad=True, rank=2, world_size=4, loss_dist_impl="shift", **overrides)
    assert create_loss(args) == "built"
    assert calls == [((), kwargs)]


def test_older_namespaces_use_open_clip_defaults():
    args = argparse.Namespace(model="RN50", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    assert type(create_loss(args)) is clipfast.nn.ClipLoss
    args.siglip = True
    loss = create_loss(args)
    assert type(loss) is clipfast.nn.SigLipLoss and loss.dist_impl == "bidir"


@pytest.mark.parametrize("overrides,match", [
    (dict(siglip=True, horovod=True), r"Horovod is not supported for SigLIP"),
], ids=["siglip_horovod"])
def test_unsupported_configurations_raise(overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        create_loss(_args(**overrides))


def test_clip_horovod_is_rejected_by_the_module():
    with pytest.raises(NotImplementedError, match="Horovod"):
        create_loss(_args(horovod=True))


@pytest.mark.parametrize("overrides", [{}, dict(local_loss=True), dict(siglip=True)],
                         ids=["clip", "clip_local", "siglip"])
def test_matches_open_clip_create_loss(overrides):
    args = _args(**overrides)
    ours, theirs = create_loss(args), open_clip.create_loss(args)
    assert type(theirs).__name__ == type(ours).__name__
    image = unit_features(40, 24, seed=1).requires_grad_()
    text = unit_features(40, 24, seed=2).requires_grad_()
    log_scale = torch.tensor(2.659, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    leaves = (image, text, log_scale, bias)
    results = []
    for loss_fn in (ours, theirs):
        loss = loss_fn(image, text, log_scale.exp(), bias)
        results.append((loss, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)))
    (ours_loss, ours_grads), (theirs_loss, theirs_grads) = results
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-5)
    for g, h in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)


def test_distillation_matches_open_clip_create_loss():
    args = _args(distill=True)
    ours, theirs = create_loss(args), open_clip.create_loss(args)
    assert type(theirs).__name__ == type(ours).__name__ == "DistillClipLoss"
    image = unit_features(40, 24, seed=1).requires_grad_()
    text = unit_features(40, 24, seed=2).requires_grad_()
    teacher_image, teacher_text = unit_features(40, 32, seed=3), unit_features(40, 32, seed=4)
    log_scale = torch.tensor(2.659, requires_grad=True)
    teacher_scale = torch.tensor(50.0)
    results = []
    for loss_fn in (ours, theirs):
        contrastive, distill = loss_fn(image, text, log_scale.exp(), teacher_image, teacher_text, teacher_scale)
        grads = torch.autograd.grad(contrastive + 0.5 * distill, (image, text, log_scale))
        results.append((contrastive, distill, grads))
    for a, b in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for g, h in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
