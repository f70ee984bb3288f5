"""``patch_timm_vit``: token reduction in a timm ``VisionTransformer`` (checked against timm 1.0.31)."""

from __future__ import annotations

import torch.nn.functional as F

from clipfast.integrations import token_reduction as reduction


def patch_timm_vit(model, *, token_removal=None, token_medoids=None):
    """Token reduction in a timm ``VisionTransformer``, on this instance only; ``handle.unpatch()`` undoes it.

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (``blocks`` of ``Block`` with timm's
            ``Attention``; LayerScale, q/k norms, drop path and ``num_prefix_tokens`` are respected).
        token_removal: ``TokenRemoval.given_scores`` hooks ``model.patch_drop`` (right after the positional
            embedding; timm's own patch dropout must be off); ``TokenRemoval.self_attention`` replaces
            the chosen blocks' ``forward`` (attention through SDPA, EViT's reduction, MLP).
        token_medoids: ``TokenMedoids``: the input of ``blocks[block]`` becomes
            :func:`clipfast.segment_medoids` of it (frames folded into the batch).

    Returns:
        A :class:`~clipfast.integrations.token_reduction.VisionPatchHandle`.
    """
    blocks = getattr(model, "blocks", None)
    if not (hasattr(model, "patch_drop") and hasattr(model, "patch_embed") and blocks is not None
            and hasattr(model, "num_prefix_tokens")):
        raise TypeError(f"patch_timm_vit expects a timm VisionTransformer, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    if token_removal is None and token_medoids is None:
        raise ValueError("patch_timm_vit: pass token_removal=... and/or token_medoids=...")
    handle = reduction.VisionPatchHandle(model, "clipfast.patch_timm_vit")
    reduction.install(handle, embedding_output=model.patch_drop, grid=tuple(model.patch_embed.grid_size),
                      blocks=blocks, num_prefix=model.num_prefix_tokens, parts_of=_block_parts,
                      token_removal=token_removal, token_medoids=token_medoids,
                      has_class_token=getattr(model, "cls_token", None) is not None)
    return handle


def _block_parts(block):
    """timm ``Block`` with timm's ``Attention``, split at EViT's reduction point."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if type(block) is not Block or type(block.attn) is not Attention:
        raise TypeError(f"EViT token removal supports timm's Block with timm's Attention, not "
                        f"{type(block).__qualname__} with {type(getattr(block, 'attn', None)).__qualname__}")
    attn = block.attn

    def attention(x):
        h = block.norm1(x)
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        q, k, v = attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                             scale=attn.scale)
        out = attn.norm(reduction.merge_heads(out))
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        return x + block.drop_path1(block.ls1(out)), q, k

    def mlp(x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return reduction.BlockParts(attention, mlp, scale=attn.scale)

