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
