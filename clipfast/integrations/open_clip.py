"""open_clip training-script integration: ``create_loss(args)`` returning clipfast's loss modules.

Mirrors ``open_clip.factory.create_loss`` of open-clip-torch 3.3.0, which ``open_clip_train.main``
calls with its parsed command-line arguments, so a training script switches with one line::

    from clipfast.integrations.open_clip import create_loss   # instead of: from open_clip import create_loss
    loss = create_loss(args)
"""

from __future__ import annotations

from clipfast import nn


def create_loss(args):
    """open_clip's ``create_loss(args)``, building clipfast's ``ClipLoss``, ``CoCaLoss`` or ``SigLipLoss``.

    Reads the fields of open_clip_train's argument namespace, with open_clip's precedence
    (distillation, then CoCa, then SigLIP, then CLIP):

    - ``args.distill`` (default False): ``DistillClipLoss(local_loss=args.local_loss, gather_with_grad=...,
      cache_labels=True, rank=..., world_size=..., use_horovod=args.horovod)``.
    - a CoCa model (``"coca" in args.model.lower()``): ``CoCaLoss(caption_loss_weight=
      args.coca_caption_loss_weight, clip_loss_weight=args.coca_contrastive_loss_weight, local_loss=...,
      gather_with_grad=..., cache_labels=True, rank=..., world_size=..., use_horovod=args.horovod)``.
    - ``args.siglip`` (default False): ``SigLipLoss(rank=args.rank, world_size=args.world_size,
      dist_impl=args.loss_dist_impl)`` (``loss_dist_impl`` defaults to None, i.e. "bidir").
    - otherwise: ``ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
      cache_labels=True, rank=args.rank, world_size=args.world_size, use_horovod=args.horovod)``.
      As in open_clip, ``loss_dist_impl`` is not passed to ``ClipLoss``.

    Fields that older namespaces may lack (``distill``, ``siglip``, ``horovod``, ``loss_dist_impl``)
    default as in open_clip_train's parser; ``model``, ``local_loss``, ``gather_with_grad``, ``rank``
    and ``world_size`` are required, as in open_clip.

    Args:
        args: an ``argparse.Namespace`` (or any object) with the fields above.

    Returns:
        A ``clipfast.nn.DistillClipLoss``, ``ClipLoss``, ``CoCaLoss`` or ``SigLipLoss`` module.

    Raises:
        NotImplementedError: ``args.horovod`` with SigLIP (open_clip rejects that combination too). The
            modules raise their own errors for settings they do not support.
    """
    horovod = getattr(args, "horovod", False)
    if getattr(args, "distill", False):
        return nn.DistillClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                                  rank=args.rank, world_size=args.world_size, use_horovod=horovod)
    if "coca" in args.model.lower():
        return nn.CoCaLoss(caption_loss_weight=args.coca_caption_loss_weight,
                           clip_loss_weight=args.coca_contrastive_loss_weight, local_loss=args.local_loss,
                           gather_with_grad=args.gather_with_grad, cache_labels=True, rank=args.rank,
                           world_size=args.world_size, use_horovod=horovod)
    if getattr(args, "siglip", False):
        if horovod:
            raise NotImplementedError("Horovod is not supported for SigLIP (open_clip rejects --horovod with "
                                      "--siglip too); use torch.distributed")
        return nn.SigLipLoss(rank=args.rank, world_size=args.world_size,
                             dist_impl=getattr(args, "loss_dist_impl", None))
    return nn.ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                       rank=args.rank, world_size=args.world_size, use_horovod=horovod)


def patch_open_clip(model, *, token_removal=None, token_medoids=None, token_merging=None):
    """Token reduction in an open_clip vision tower, on this instance only; ``handle.unpatch()`` undoes it.

    Args:
        model: an ``open_clip`` ``CLIP`` / ``CustomTextCLIP`` (its ``.visual`` is patched) or a
            ``VisionTransformer`` itself (batch first, open_clip's default since 2.24).
        token_removal: a :class:`~clipfast.integrations.token_reduction.TokenRemoval`:
            ``given_scores`` hooks ``visual.patch_dropout`` (right after the positional embedding; the
            model's own patch dropout must be off), ``self_attention`` replaces the chosen resblocks'
            ``forward`` (attention through SDPA from the block's own weights, then EViT's reduction, then
            the MLP). EViT supports the blocks :func:`clipfast.attention_scores` reads
            (:mod:`clipfast.integrations.vision_blocks`): ``ResidualAttentionBlock`` with
            ``nn.MultiheadAttention`` and ``CustomResidualAttentionBlock`` with open_clip's ``Attention``
            (qk-norm, head scale, inner and post-attention norms; not scaled-cosine attention).
        token_medoids: a :class:`~clipfast.integrations.token_reduction.TokenMedoids`: the input of
            ``transformer.resblocks[block]`` becomes :func:`clipfast.segment_medoids` of it; images are
            the frames of videos folded into the batch (``(B*T, 3, H, W)``) and the tower returns
            ``(B*S, dim)``, one embedding per segment.
        token_merging: a :class:`~clipfast.integrations.token_reduction.TokenMerging` (ToMe): from the first
            block that merges on, each resblock's ``forward`` runs attention (SDPA from the block's own
            weights, proportional attention as a key bias), merges ``r`` tokens by its keys
            (:func:`clipfast.token_merge`), then the MLP; the same blocks as EViT. Not combined with the
            other two.

    Returns:
        A :class:`~clipfast.integrations.token_reduction.VisionPatchHandle` (``keep_scores(scores)`` for
        given scores; ``unpatch()``; a context manager).

    Raises:
        TypeError: ``model`` is not an open_clip vision tower or model, or an EViT block is not supported
            (the same error ``attention_scores`` raises for it).
        ValueError: neither reduction asked for, or one that does not fit the model.

    Example (A-CLIP's online view, scores from an unpatched EMA copy)::

        handle = clipfast.patch_open_clip(model, token_removal=TokenRemoval.given_scores(0.5, block=2))
        scores = clipfast.attention_scores(ema_model.visual, ema_view)
        with handle.keep_scores(scores):
            features = model.encode_image(online_view)
    """
    from clipfast.integrations import token_reduction as reduction
    from clipfast.integrations import vision_blocks

    return reduction.patch_vision_tower("patch_open_clip", model, vision_blocks.open_clip_tower(model),
                                        "an open_clip CLIP model or VisionTransformer", token_removal=token_removal,
                                        token_medoids=token_medoids, token_merging=token_merging)
