"""``patch_timm_vit``: token reduction in a timm ``VisionTransformer`` (checked against timm 1.0.31)."""

from __future__ import annotations

from clipfast.integrations import token_reduction as reduction
from clipfast.integrations import vision_blocks


def patch_timm_vit(model, *, token_removal=None, token_medoids=None, token_merging=None):
    """Token reduction in a timm ``VisionTransformer``, on this instance only; ``handle.unpatch()`` undoes it.

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (LayerScale, q/k norms, drop path and
            ``num_prefix_tokens`` are respected).
        token_removal: ``TokenRemoval.given_scores`` hooks ``model.patch_drop`` (right after the positional
            embedding; timm's own patch dropout must be off); ``TokenRemoval.self_attention`` replaces
            the chosen blocks' ``forward`` (attention through SDPA, EViT's reduction, MLP), for the blocks
            :func:`clipfast.attention_scores` reads too: timm's ``Block`` with timm's ``Attention``
            (:mod:`clipfast.integrations.vision_blocks`).
        token_medoids: ``TokenMedoids``: the input of ``blocks[block]`` becomes
            :func:`clipfast.segment_medoids` of it (frames folded into the batch).
        token_merging: ``TokenMerging`` (ToMe): from the first block that merges on, each block's ``forward``
            runs attention (proportional, as a key bias), :func:`clipfast.token_merge` by its keys, then the
            MLP; timm's LayerScale, q/k norms, drop path and prefix tokens are respected.

    Returns:
        A :class:`~clipfast.integrations.token_reduction.VisionPatchHandle`.
    """
    return reduction.patch_vision_tower("patch_timm_vit", model, vision_blocks.timm_tower(model),
                                        "a timm VisionTransformer", token_removal=token_removal,
                                        token_medoids=token_medoids, token_merging=token_merging)
