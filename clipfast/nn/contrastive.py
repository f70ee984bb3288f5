"""Drop-in replacements for open_clip's ``ClipLoss``, ``CoCaLoss``, ``DistillClipLoss`` and ``SigLipLoss``
(open-clip-torch 3.3.0).

Same constructor arguments, same ``forward`` signatures and return conventions (a 0-d tensor, or
``{"contrastive_loss": loss}`` with ``output_dict=True``), same numbers and gradients per rank,
computed by the fused ops (no logits block is ever materialised). With ``world_size > 1`` the
features travel over ``torch.distributed`` (initialise the process group first; gloo and NCCL).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from clipfast import distributed, functional


def _check_process_group(cls_name: str, rank: int, world_size: int) -> None:
    # As open_clip, the rank is not read with world_size == 1 (launchers pass the global rank along).
    if world_size < 1 or (world_size > 1 and not 0 <= rank < world_size):
        raise ValueError(f"clipfast.nn.{cls_name}: rank={rank} and world_size={world_size} are inconsistent")


def _require_process_group(cls_name: str, rank: int, world_size: int) -> None:
    actual = distributed.world_info()
    if actual != (rank, world_size):
        raise RuntimeError(
            f"clipfast.nn.{cls_name} was built for rank {rank} of {world_size}, but torch.distributed reports "
            f"rank {actual[0]} of {actual[1]}" + ("" if actual[1] > 1 else " (is the process group initialised?)"))


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (symmetric InfoNCE), fused; see :func:`clipfast.clip_loss`.

    Args (as open_clip): local_loss, gather_with_grad, cache_labels (accepted; the fused op builds
    no label tensor), rank, world_size, use_horovod (accepted for signature compatibility; True raises).
    dist_impl: None (open_clip's all-gather semantics chosen by local_loss / gather_with_grad, all four
    combinations exact) or "ring": blocks travel rank to rank, no rank holds the gathered features;
    per-rank loss and gradients equal open_clip's ``local_loss=True, gather_with_grad=True`` (the
    production setting), which the ring requires.

    With world_size > 1 each rank gets its own loss; feature gradients follow open_clip (summed into
    the owner by the gather's backward), ``logit_scale`` gets the rank-local gradient that DDP averages.
    Every rank must hold the same number n of (n, D) image and text features.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, dist_impl: Optional[str] = None):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("clipfast.nn.ClipLoss does not support Horovod (open_clip removed it too)")
        if dist_impl not in (None, "ring"):
            raise ValueError(f"dist_impl must be None (all-gather, as open_clip) or 'ring', got {dist_impl!r}")
        _check_process_group("ClipLoss", rank, world_size)
        if dist_impl == "ring" and world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError("dist_impl='ring' computes open_clip's local_loss=True, gather_with_grad=True loss; "
                             "set both (the other combinations run with dist_impl=None)")
        self.dist_impl = dist_impl
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        # open_clip's label cache, read and written only by get_ground_truth (forward builds no labels).
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's ``ClipLoss.get_ground_truth``: ``arange(num_logits)`` int64 on ``device``, offset by
        ``num_logits * rank`` with ``world_size > 1`` and ``local_loss``; cached per device when
        ``cache_labels``. Not used by :meth:`forward` (the fused op needs no label tensor)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``ClipLoss.get_logits``: ``(logits_per_image, logits_per_text)``.

        MATERIALISES the logits (n x N each, N the global batch with ``world_size > 1``; ``local_loss``
        keeps this rank's rows) exactly as open_clip does, for code that inspects or post-processes them;
        :meth:`forward` never builds them. With ``world_size > 1`` the features are all-gathered as in
        :meth:`forward` (``gather_with_grad`` decides whether gradients flow back to the other ranks)."""
        if self.world_size > 1:
            _require_process_group("ClipLoss", self.rank, self.world_size)
            all_image, all_text = distributed.gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = False):
        """image_features, text_features: (n, D) this rank's features; logit_scale: exponentiated, 0-d or [1]."""
        if self.world_size == 1:
            loss = functional.clip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image, text, logit_scale, logit_bias):
        _require_process_group("ClipLoss", self.rank, self.world_size)
        if self.dist_impl == "ring":
            return distributed.ring_clip_loss(image, text, logit_scale, logit_bias)
        distributed.check_consistent_features(image, text)
        all_image, all_text = distributed.gather_features(
            image, text, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
        if not self.local_loss:  # every rank computes the global N x N loss (fused)
            return functional.clip_loss(all_image, all_text, logit_scale, logit_bias)
        offset = self.rank * image.shape[0]  # this rank's rows are global labels offset .. offset + n
        image_to_text = functional.contrastive_cross_entropy(image, all_text, logit_scale, logit_bias,
                                                             label_offset=offset)
        text_to_image = functional.contrastive_cross_entropy(text, all_image, logit_scale, logit_bias,
                                                             label_offset=offset)
        return (image_to_text + text_to_image) / 2



class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: the contrastive loss of :class:`ClipLoss` (fused, every distributed mode of
    ClipLoss) plus CoCa's captioning cross-entropy, each weighted::

        contrastive_loss = clip_loss_weight * ClipLoss(image_features, text_features, logit_scale)
        caption_loss = caption_loss_weight * cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id)

    The caption logits ``(B, L, V)`` are the text decoder's output, which the model has already
    materialised; the caption term is computed exactly as open_clip computes it (``nn.CrossEntropyLoss``),
    so only the contrastive part changes. With ``clip_loss_weight == 0`` the contrastive loss is open_clip's
    int64 zero on the logits' device.

    Args (as open_clip): caption_loss_weight, clip_loss_weight, pad_id (the padding token ignored by the
    caption loss, 0 for open_clip's tokenizer), then ClipLoss's (local_loss, gather_with_grad, cache_labels,
    rank, world_size, use_horovod, dist_impl).
    """

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, dist_impl: Optional[str] = None):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, dist_impl=dist_impl)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale: torch.Tensor, output_dict: bool = False):
        """image_features, text_features: (n, D); logits: (B, L, V) caption logits; labels: (B, L) int64 token
        ids; logit_scale: exponentiated, 0-d or [1]. Returns ``(contrastive_loss, caption_loss)``, or
        ``{"contrastive_loss": ..., "caption_loss": ...}`` with ``output_dict``."""
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss

class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss``: :class:`ClipLoss`'s contrastive loss plus the cross-entropy between the
    teacher's and the student's softmax over the same batch, both directions (see
    :func:`clipfast.clip_distill_loss`), fused: neither the student's nor the teacher's logits are built.

    Args: as :class:`ClipLoss` (all-gather modes; ``dist_impl="ring"`` is not offered for distillation).
    With ``world_size > 1`` the teacher's features are gathered like the student's (without gradient) and
    each rank's losses are open_clip's: ``local_loss`` gives this rank's rows against every column.
    The teacher's features and scale must not require grad (open_clip computes them under no_grad).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, dist_impl: Optional[str] = None):
        if dist_impl is not None:
            raise ValueError("clipfast.nn.DistillClipLoss supports dist_impl=None (open_clip's all-gather) only")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod)

    def dist_loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """open_clip's ``DistillClipLoss.dist_loss`` on MATERIALISED logits:
        ``-(softmax(teacher) * log_softmax(student)).sum(1).mean(0)``; :meth:`forward` never calls it."""
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                dist_image_features: torch.Tensor, dist_text_features: torch.Tensor, dist_logit_scale: torch.Tensor,
                output_dict: bool = False):
        """The student's (n, D) features and exponentiated scale, then the teacher's (n, D_t) and scale.
        Returns ``(contrastive_loss, distill_loss)``, or ``{"contrastive_loss", "distill_loss"}`` with
        ``output_dict``."""
        if self.world_size == 1:
            contrastive, distill = functional.clip_distill_loss(image_features, text_features, logit_scale,
                                                                dist_image_features, dist_text_features,
                                                                dist_logit_scale)
        else:
            contrastive, distill = self._distributed_distill(image_features, text_features, logit_scale,
                                                             dist_image_features, dist_text_features, dist_logit_scale)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def _distributed_distill(self, image, text, logit_scale, teacher_image, teacher_text, teacher_scale):
        _require_process_group("DistillClipLoss", self.rank, self.world_size)
        distributed.check_consistent_features(image, text)
        all_image, all_text = distributed.gather_features(
            image, text, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
        all_teacher_image, all_teacher_text = distributed.gather_features(
            teacher_image, teacher_text, local_loss=self.local_loss, gather_with_grad=False)
        if not self.local_loss:  # every rank computes the global N x N losses (fused)
            return functional.clip_distill_loss(all_image, all_text, logit_scale, all_teacher_image, all_teacher_text,
                                                teacher_scale)
        offset = self.rank * image.shape[0]
        image_contrastive, image_distill = functional.distill_cross_entropy(
            image, all_text, logit_scale, teacher_image, all_teacher_text, teacher_scale, label_offset=offset)
        text_contrastive, text_distill = functional.distill_cross_entropy(
            text, all_image, logit_scale, teacher_text, all_teacher_image, teacher_scale, label_offset=offset)
        return (image_contrastive + text_contrastive) / 2, (image_distill + text_distill) / 2


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (pairwise sigmoid loss), fused; see :func:`clipfast.siglip_loss`.

    Args (as open_clip): cache_labels (accepted), rank, world_size, dist_impl (None = "bidir",
    "shift", "reduce", "gather": how the other ranks' text blocks arrive; the loss and gradients are
    open_clip's for every choice: the local block with its positives, each remote block as negatives).
    """

    _DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        if dist_impl not in self._DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self._DIST_IMPLS}, got {dist_impl!r}")
        _check_process_group("SigLipLoss", rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        self.prev_num_logits = 0  # open_clip's (unused) label cache state
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's ``SigLipLoss.get_ground_truth``: a (num_logits, num_logits) matrix of -1 with +1 on the
        diagonal (all -1 when ``negative_only``), in ``dtype`` on ``device``. Not used by :meth:`forward`."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``SigLipLoss.get_logits``: ``logit_scale * image_features @ text_features.T (+ logit_bias)``,
        MATERIALISED (N x M), for code that inspects them; :meth:`forward` and :meth:`_loss` never build it."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """open_clip's ``SigLipLoss._loss`` (one block: the local block with positives on the diagonal, or a
        remote block as negatives only), fused: ``-sum logsigmoid(labels * logits) / N`` without the logits.
        ``logit_bias=None`` means no bias, as in open_clip. Subclasses and distributed code call it per block."""
        if logit_bias is None:
            logit_bias = torch.zeros((), dtype=torch.float32, device=image_features.device)
        return functional.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                      negative_only=bool(negative_only))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, output_dict: bool = False):
        """image_features, text_features: (n, D) this rank's features; logit_scale (exponentiated) and
        logit_bias: 0-d or [1]."""
        if self.world_size == 1:
            loss = functional.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            _require_process_group("SigLipLoss", self.rank, self.world_size)
            loss = distributed.siglip_distributed_loss(image_features, text_features, logit_scale, logit_bias,
                                                       self.dist_impl)
        return {"contrastive_loss": loss} if output_dict else loss
