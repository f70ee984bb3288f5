"""Bad input gets a clear ValueError/TypeError naming the problem, never a crash or a silent number."""

import pytest
import torch

import clipfast
from clipfast.testing import unit_features

A = unit_features(8, 4)
B = unit_features(8, 4, seed=1)
S = torch.tensor(10.0)
BIAS = torch.tensor(-1.0)


@pytest.mark.parametrize("args,error,match", [
    ((A[:0], B[:0], S), ValueError, "empty batch"),
    ((A, B[:5], S), ValueError, "as many images as texts"),
    ((A, unit_features(8, 5), S), ValueError, "feature dimensions differ"),
    ((A.to(torch.int64), B.to(torch.int64), S), TypeError, "must be float16, bfloat16, float32 or float64"),
    ((A, B.double(), S), TypeError, "dtypes differ"),
    ((A, B.to("meta"), S), ValueError, "is on"),
    ((A, B, torch.tensor(10.0, device="meta")), ValueError, "logit_scale is on"),
    ((A, B, torch.tensor(float("nan"))), ValueError, "logit_scale must be finite and >= 0"),
    ((A, B, torch.tensor(float("inf"))), ValueError, "logit_scale must be finite and >= 0"),
    ((A, B, torch.tensor(-1.0)), ValueError, "logit_scale must be finite and >= 0"),
    ((A, B, torch.ones(2)), ValueError, "0-d or shape \\[1\\]"),
    ((A, B, torch.tensor(3)), TypeError, "floating-point"),
    ((A, B, "10"), TypeError, "logit_scale must be a tensor or a float"),
    ((A.numpy(), B, S), TypeError, "must be a torch.Tensor"),
    ((A[0], B[0], S), ValueError, "must be 2-D"),
    ((A[:, :0], B[:, :0], S), ValueError, "feature dimension 0"),
])
def test_clip_loss_rejects(args, error, match):
    with pytest.raises(error, match=match):
        clipfast.clip_loss(*args)


def test_label_smoothing_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        clipfast.clip_loss(A, B, S, label_smoothing=1.5)


def test_rectangular_label_offset_range():
    with pytest.raises(ValueError, match="label_offset"):
        clipfast.contrastive_cross_entropy(A, B, S, label_offset=1)  # 1 + 8 > 8 keys
    with pytest.raises(ValueError, match="label_offset"):
        clipfast.contrastive_cross_entropy(A, B, S, label_offset=-1)


def test_siglip_rejects():
    with pytest.raises(ValueError, match="needs logit_bias"):
        clipfast.siglip_loss(A, B, S, None)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        clipfast.siglip_loss(A, B, S, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="negative_only"):
        clipfast.siglip_loss(A, B[:5], S, BIAS)


def test_python_float_scale_is_accepted():
    ref = clipfast.clip_loss(A, B, torch.tensor(10.0))
    assert torch.equal(clipfast.clip_loss(A, B, 10.0), ref)


def test_modules_reject_bad_configurations():
    with pytest.raises(NotImplementedError, match="Horovod"):
        clipfast.nn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        clipfast.nn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="dist_impl"):
        clipfast.nn.ClipLoss(dist_impl="bidir")
    with pytest.raises(ValueError, match="local_loss=True, gather_with_grad=True"):
        clipfast.nn.ClipLoss(world_size=2, dist_impl="ring")
    with pytest.raises(ValueError, match="inconsistent"):
        clipfast.nn.ClipLoss(rank=2, world_size=2)


def test_multi_process_module_without_process_group_raises():
    with pytest.raises(RuntimeError, match="is the process group initialised"):
        clipfast.nn.ClipLoss(rank=1, world_size=2)(A, B, S)
    with pytest.raises(RuntimeError, match="is the process group initialised"):
        clipfast.nn.SigLipLoss(rank=0, world_size=4)(A, B, S, BIAS)
