"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss`` (open-clip-torch 3.3.0).

Same constructor arguments, same ``forward`` signatures and return conventions (a 0-d tensor, or
``{"contrastive_loss": loss}`` with ``output_dict=True``), same numbers and gradients, computed by the
fused ops (no N x N logits). This release covers a single process (``world_size == 1``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from clipfast import functional


def _single_process_only(cls_name: str, world_size: int) -> None:
    if world_size != 1:
        raise NotImplementedError(
            f"clipfast.nn.{cls_name}: world_size={world_size} is not supported yet; this release computes "
            "the loss of one process (world_size=1). Use open_clip's loss for multi-process training for now.")


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (symmetric InfoNCE), fused; see :func:`clipfast.clip_loss`.

    Args (as open_clip): local_loss, gather_with_grad (meaningful only with world_size > 1),
    cache_labels (accepted; the fused op builds no label tensor), rank, world_size (must be 1 here),
    use_horovod (accepted for signature compatibility; True raises).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("clipfast.nn.ClipLoss does not support Horovod (open_clip removed it too)")
        _single_process_only("ClipLoss", world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = False):
        """image_features, text_features: (N, D); logit_scale: exponentiated, 0-d or [1]."""
        loss = functional.clip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (pairwise sigmoid loss), fused; see :func:`clipfast.siglip_loss`.

    Args (as open_clip): cache_labels (accepted), rank, world_size (must be 1 here), dist_impl
    (one of None, "bidir", "shift", "reduce", "gather"; only used with world_size > 1).
    """

    _DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        if dist_impl not in self._DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self._DIST_IMPLS}, got {dist_impl!r}")
        _single_process_only("SigLipLoss", world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, output_dict: bool = False):
        """image_features, text_features: (N, D); logit_scale (exponentiated) and logit_bias: 0-d or [1]."""
        loss = functional.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
