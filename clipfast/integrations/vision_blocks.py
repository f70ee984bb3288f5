"""The ViT vision towers clipfast reads and patches, described once per framework.

Two paths work inside the transformer blocks of an open_clip, timm or transformers vision tower:

- :func:`clipfast.attention_scores` hooks every block during one ordinary forward and reads the [CLS]
  row of its attention softmax (A-CLIP's patch scores);
- EViT token removal (``TokenRemoval.self_attention`` in ``patch_open_clip``, ``patch_timm_vit`` and
  ``patch_hf_clip``) replaces chosen blocks' ``forward`` by the same computation split in two, attention
  then MLP, and reduces the tokens in between by that same [CLS] row; ToMe's token merging
  (``TokenMerging``) splits the blocks the same way, with proportional attention as a key bias, and merges
  tokens in between by their keys.

All learn everything about a tower from this module. :func:`open_clip_tower`, :func:`timm_tower` and
:func:`hf_tower` (or :func:`find_tower`, which tries all three) give a :class:`VisionTower`: where the
blocks are, the module whose output is the token sequence right after the positional embedding, the
number of prefix tokens, the patch grid, how to run the tower. Its :meth:`VisionTower.block` gives a
:class:`VisionBlock` for one block, or raises the one TypeError every path shows, so all accept and
refuse exactly the same blocks and attention modules:

==============  =================================  ===================================================
framework       block                              attention (q, k of the softmax from)
==============  =================================  ===================================================
open_clip 3.3   ``ResidualAttentionBlock``         ``nn.MultiheadAttention``, packed ``in_proj_weight``,
                                                   no added key tokens (``in_proj_weight``)
open_clip 3.3   ``CustomResidualAttentionBlock``   open_clip's ``Attention`` with or without qk-norm,
                (qk-norm and the other options)    head scale, inner norm (``in_proj_weight``, then
                                                   ``ln_q`` / ``ln_k``); not scaled-cosine attention,
                                                   whose own forward fails in open_clip 3.3
                                                   (``torch.bmm`` on 4-D tensors)
timm 1.0.31     ``Block``                          ``timm.layers.Attention`` with or without q/k norm,
                                                   scale norm, gate (``qkv``, then ``q_norm`` /
                                                   ``k_norm``); not ``DiffAttention``, ``AttentionRope``
transformers    ``CLIPEncoderLayer`` and its        ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
                copies (``layer_norm1``,           Linear layers, ``num_heads``, ``scale``
                ``self_attn``, ``layer_norm2``,
                ``mlp``)
==============  =================================  ===================================================

open_clip and timm classes are matched exactly, by qualified name (nothing is imported from those
frameworks here): the paths re-derive the block's computation from its weights, and a subclass may
have changed it. The transformers layers are matched by structure, as the CLIP family (AltCLIP,
ChineseCLIP, ...) copies ``CLIPEncoderLayer`` under other names. The given-scores and medoid insertions
of the patches never look inside a block, so they need no block description.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from clipfast.attention_scores import cls_row, linear_key_cls_row

#: ``report(row)`` receives one layer's head-mean [CLS] softmax row, (B, N) (see :class:`VisionBlock`).
Report = Callable[[torch.Tensor], None]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * Dh) -> (B, H, N, Dh)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) -> (B, N, H * Dh)."""
    return t.transpose(1, 2).flatten(2)


@dataclasses.dataclass
class VisionBlock:
    """One supported transformer block (all tensors batch first).

    - ``attention(x, key_bias=None) -> (x + attention branch, q, k)``: the block's first half from its own
      weights, through fused SDPA; x (B, N, D); q, k (B, H, N, Dh) exactly as the softmax sees them (after
      any q/k norm), i.e. the block attends with ``softmax(scale * q k^T + key_bias)``; ``key_bias``
      (B, 1, 1, N) in q's dtype, or None, is added to every query's logits (ToMe's proportional attention:
      ``log(size)`` of the keys), as SDPA's additive ``attn_mask``.
    - ``mlp(x) -> x + MLP branch``: the second half, on however many tokens are left.
    - ``scale``: the logit scale of that softmax.
    - ``watch_cls_row(report) -> handles``: hooks on the block's own submodules that, while the block
      runs its ordinary forward, call ``report`` with the head-mean [CLS] row
      ``1/H sum_h softmax_j(scale * q[b, h, 0] . k[b, h, j])`` (B, N), computed from the q and k (or
      their inputs) that forward computes anyway. The caller removes the returned handles.

    Not frozen: patched forwards build one per call (so a deep copy of a patched model uses its own
    weights), and ``torch.compile`` traces that construction.
    """

    attention: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    watch_cls_row: Callable[[Report], List[RemovableHandle]]


@dataclasses.dataclass(frozen=True)
class VisionTower:
    """Where a supported vision tower keeps what clipfast reads and patches.

    Attributes:
        framework: ``"open_clip"``, ``"timm"`` or ``"transformers"``.
        module: the tower itself (containers such as open_clip's ``CLIP`` already unwrapped).
        blocks: its transformer blocks in order (an ``nn.ModuleList`` or ``nn.Sequential``);
            ``blocks_path`` names them for messages (``"transformer.resblocks"``).
        embedding_output: the module whose output is the (B, P + L, D) token sequence right after the
            positional embedding (where A-CLIP keeps its chosen patches), named by
            ``embedding_output_path``; open_clip's and timm's are their patch-dropout modules.
        num_prefix_tokens: P, the tokens before the patches ([CLS] and any register tokens).
        has_class_token: whether token 0 is a [CLS] token (False for timm ``class_token=False``, SigLIP).
        grid: the patch grid (rows, columns), L = rows * columns.
        describe_block: ``describe_block(block, where) -> VisionBlock``, this framework's block
            description; raises TypeError naming ``where`` for a block it does not support.
        run: ``run(images)``, the tower's forward on (B, C, H, W) images.
    """

    framework: str
    module: nn.Module
    blocks: nn.Module
    blocks_path: str
    embedding_output: nn.Module
    embedding_output_path: str
    num_prefix_tokens: int
    has_class_token: bool
    grid: Tuple[int, int]
    describe_block: Callable[[nn.Module, str], VisionBlock]
    run: Callable[[torch.Tensor], Any]

    def block_path(self, index: int) -> str:
        return f"{self.blocks_path}[{index}]"

    def block(self, index: int) -> VisionBlock:
        """The description of ``blocks[index]``; TypeError if that block is not supported."""
        return self.describe_block(self.blocks[index], self.block_path(index))


def unsupported(where: str, module: Any, why: str) -> TypeError:
    """The error every path raises for a block or attention module it cannot use."""
    return TypeError(f"clipfast's [CLS]-attention scores, EViT token removal and token merging do not support {where} "
                     f"({type(module).__name__}): {why}")


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _innermost(model: nn.Module) -> nn.Module:
    """Follow ``vision_model`` / ``visual`` containers (transformers ``CLIPModel``, ``CLIPVisionModel`` 4.x,
    ``...WithProjection``; open_clip ``CLIP``) down to the tower."""
    while True:
        inner = getattr(model, "vision_model", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "visual", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_tower(model: nn.Module) -> Optional[VisionTower]:
    """The description of ``model``'s vision tower in whichever supported framework it matches, else None."""
    for describe in (hf_tower, open_clip_tower, timm_tower):
        tower = describe(model)
        if tower is not None:
            return tower
    return None


# ---------------------------------------------------------------------------------------------- open_clip

_OPEN_CLIP = "open_clip.transformer."


def open_clip_tower(model: nn.Module) -> Optional[VisionTower]:
    """An open_clip ``VisionTransformer`` (or a model holding it as ``.visual``), else None.

    Raises:
        TypeError: the transformer runs sequence first (open_clip before 2.24); every insertion here
            assumes batch-first tokens.
    """
    visual = _innermost(model)
    transformer = getattr(visual, "transformer", None)
    if not (hasattr(visual, "conv1") and hasattr(visual, "class_embedding") and hasattr(visual, "patch_dropout")
            and hasattr(visual, "grid_size") and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList)):
        return None
    if not getattr(transformer, "batch_first", True):
        raise TypeError(f"{type(visual).__name__}'s transformer is sequence first; clipfast supports batch-first "
                        "open_clip towers only (the default since open_clip 2.24)")
    return VisionTower("open_clip", visual, transformer.resblocks, "transformer.resblocks", visual.patch_dropout,
                       "patch_dropout", 1, True, tuple(visual.grid_size), open_clip_block, visual)


def open_clip_block(block: nn.Module, where: str) -> VisionBlock:
    """open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or ``CustomResidualAttentionBlock``
    (open_clip's ``Attention``); both project q, k, v with one packed ``in_proj_weight`` (3D, D)."""
    attn = getattr(block, "attn", None)
    kind = _qualified_name(block)
    if kind == _OPEN_CLIP + "ResidualAttentionBlock" and type(attn) is nn.MultiheadAttention:
        if attn.in_proj_weight is None:
            raise unsupported(f"{where}.attn", attn, "it has no packed in_proj_weight (separate q/k/v projections)")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise unsupported(f"{where}.attn", attn, "it adds key tokens (add_bias_kv / add_zero_attn)")
        return _open_clip_parts(block, attn, None, lambda out: attn.out_proj(merge_heads(out)), attn.dropout,
                                attn.head_dim ** -0.5, _multihead_attention_inputs)
    if kind == _OPEN_CLIP + "CustomResidualAttentionBlock" and _qualified_name(attn) == _OPEN_CLIP + "Attention":
        if attn.logit_scale is not None:
            raise unsupported(f"{where}.attn", attn, "scaled-cosine attention is not supported (open_clip 3.3's own "
                                                     "forward of it fails: torch.bmm on 4-D tensors)")

        def finish(out):  # Attention.forward after its softmax, then the block's optional ln_attn
            if attn.head_scale is not None:
                out = out * attn.head_scale
            return block.ln_attn(attn.out_drop(attn.out_proj(attn.ln_inner(merge_heads(out)))))

        plain = isinstance(attn.ln_q, nn.Identity) and isinstance(attn.ln_k, nn.Identity)
        return _open_clip_parts(block, attn, None if plain else (attn.ln_q, attn.ln_k), finish, attn.attn_drop.p,
                                attn.scale, _attention_inputs)
    if kind not in (_OPEN_CLIP + "ResidualAttentionBlock", _OPEN_CLIP + "CustomResidualAttentionBlock"):
        raise unsupported(where, block, "expected open_clip's ResidualAttentionBlock or CustomResidualAttentionBlock")
    raise unsupported(f"{where}.attn", attn, "unknown attention class (expected nn.MultiheadAttention in a "
                                             "ResidualAttentionBlock, open_clip's Attention in a "
                                             "CustomResidualAttentionBlock)")


def _multihead_attention_inputs(args, kwargs):
    """(query, key) inputs of ``nn.MultiheadAttention(query, key, value, ...)``."""
    return (args[0] if args else kwargs["query"]), (args[1] if len(args) > 1 else kwargs["key"])


def _attention_inputs(args, kwargs):
    """(query, key) inputs of open_clip's self-attention ``Attention(x, attn_mask=None)``."""
    x = args[0] if args else kwargs["x"]
    return x, x


def _open_clip_parts(block: nn.Module, attn: nn.Module, qk_norm: Optional[Tuple[nn.Module, nn.Module]],
                     finish: Callable[[torch.Tensor], torch.Tensor], dropout: float, scale: float,
                     attention_inputs) -> VisionBlock:
    """An open_clip block: ``x + ls_1(finish(SDPA(q, k, v)))`` then ``x + ls_2(mlp(ln_2(x)))``, with
    q, k, v = ``in_proj(ln_1(x))`` split into heads and ``qk_norm`` (None: no norm) applied to q and k."""
    heads = attn.num_heads

    def attention(x, key_bias=None):
        packed = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (split_heads(t, heads) for t in packed.chunk(3, dim=-1))
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=dropout if attn.training else 0.0,
                                             scale=scale)
        return x + block.ls_1(finish(out)), q, k

    def mlp(x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def watch_cls_row(report):
        def hook(module, args, kwargs):  # a pre-hook: the attention's inputs, before it runs
            query, keys = attention_inputs(args, kwargs)
            report(_open_clip_cls_row(attn, query, keys, qk_norm, heads, scale))

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

    return VisionBlock(attention, mlp, scale, watch_cls_row)


def _open_clip_cls_row(attn: nn.Module, query: torch.Tensor, keys: torch.Tensor,
                       qk_norm: Optional[Tuple[nn.Module, nn.Module]], heads: int, scale: float) -> torch.Tensor:
    """The [CLS] row from the attention's inputs query (B, N, D) and keys (B, N, D): without q/k norm the
    keys are never formed (:func:`clipfast.attention_scores.linear_key_cls_row`)."""
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if qk_norm is None:
        return linear_key_cls_row(query[:, :1], keys, weight, bias, heads, scale)
    # qk-norm is not linear in the input: form q of the [CLS] token and all keys, then normalise.
    dim = keys.shape[-1]
    q0 = F.linear(query[:, :1], weight[:dim], None if bias is None else bias[:dim])
    k = F.linear(keys, weight[dim:2 * dim], None if bias is None else bias[dim:2 * dim])
    return cls_row(qk_norm[0](split_heads(q0, heads)), qk_norm[1](split_heads(k, heads)), scale)


# ---------------------------------------------------------------------------------------------- timm

_TIMM_BLOCK = "timm.models.vision_transformer.Block"
_TIMM_ATTENTION = "timm.layers.attention.Attention"


def timm_tower(model: nn.Module) -> Optional[VisionTower]:
    """A timm ``VisionTransformer`` (``blocks``, ``patch_embed``, ``patch_drop``, ``num_prefix_tokens``), else None."""
    vit = _innermost(model)
    blocks = getattr(vit, "blocks", None)
    if not (isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(vit, "patch_embed")
            and hasattr(vit, "patch_drop") and hasattr(vit, "num_prefix_tokens")):
        return None
    return VisionTower("timm", vit, blocks, "blocks", vit.patch_drop, "patch_drop", int(vit.num_prefix_tokens),
                       getattr(vit, "cls_token", None) is not None, tuple(vit.patch_embed.grid_size), timm_block,
                       vit)


def timm_block(block: nn.Module, where: str) -> VisionBlock:
    """timm's ``Block`` (``x + drop_path1(ls1(attn(norm1(x))))``, then the MLP alike) with timm's ``Attention``."""
    attn = getattr(block, "attn", None)
    if _qualified_name(block) != _TIMM_BLOCK:
        raise unsupported(where, block, "expected timm's Block (norm1, attn, ls1, drop_path1, then norm2, mlp, ls2, "
                                        "drop_path2)")
    if _qualified_name(attn) != _TIMM_ATTENTION:
        raise unsupported(f"{where}.attn", attn, "expected timm's Attention (a fused qkv Linear with 3 x num_heads x "
                                                 "head_dim outputs, q_norm and k_norm)")
    heads = attn.num_heads

    def attention(x, key_bias=None):
        h = block.norm1(x)
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        q, k, v = attn.qkv(h).unflatten(-1, (3, heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
        out = attn.norm(merge_heads(out))
        if gate is not None:
            out = out * gate
        return x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out)))), q, k

    def mlp(x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def watch_cls_row(report):
        def hook(module, args, qkv):  # q and k straight from the block's own qkv output: no extra projection
            batch, n, _ = qkv.shape
            qkv = qkv.reshape(batch, n, 3, heads, -1)
            q0 = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, H, 1, Dh)
            report(cls_row(q0, attn.k_norm(qkv[:, :, 1].transpose(1, 2)), attn.scale))

        return [attn.qkv.register_forward_hook(hook)]

    return VisionBlock(attention, mlp, attn.scale, watch_cls_row)


# ---------------------------------------------------------------------------------------------- transformers


def hf_tower(model: nn.Module) -> Optional[VisionTower]:
    """A transformers vision transformer (``embeddings`` and ``encoder.layers``): ``CLIPVisionModel`` (5.x),
    ``CLIPVisionTransformer`` (4.x), or any model holding one as ``.vision_model`` (``CLIPModel``,
    ``CLIPVisionModelWithProjection``); else None."""
    vision = _innermost(model)
    embeddings, encoder = getattr(vision, "embeddings", None), getattr(vision, "encoder", None)
    if not (isinstance(embeddings, nn.Module) and isinstance(getattr(encoder, "layers", None), nn.ModuleList)):
        return None

    def pair(size):
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    grid = tuple(s // p for s, p in zip(pair(embeddings.image_size), pair(embeddings.patch_size)))
    return VisionTower("transformers", vision, encoder.layers, "encoder.layers", embeddings, "embeddings", 1,
                       hasattr(embeddings, "class_embedding"), grid, hf_layer,
                       lambda images: vision(pixel_values=images))


def hf_layer(layer: nn.Module, where: str) -> VisionBlock:
    """``CLIPEncoderLayer``: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""
    if not all(isinstance(getattr(layer, name, None), nn.Module)
               for name in ("layer_norm1", "self_attn", "layer_norm2", "mlp")):
        raise unsupported(where, layer, "expected a CLIPEncoderLayer (layer_norm1, self_attn, layer_norm2, mlp)")
    attn = layer.self_attn
    if not (all(isinstance(getattr(attn, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
            and hasattr(attn, "num_heads") and hasattr(attn, "scale")):
        raise unsupported(f"{where}.self_attn", attn, "expected CLIP's attention (q_proj, k_proj, v_proj and "
                                                      "out_proj Linear layers, num_heads, scale)")
    heads = attn.num_heads

    def attention(x, key_bias=None):
        h = layer.layer_norm1(x)
        q, k, v = (split_heads(proj(h), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias,
                                             dropout_p=attn.dropout if attn.training else 0.0, scale=attn.scale)
        return x + attn.out_proj(merge_heads(out)), q, k

    def mlp(x):
        return x + layer.mlp(layer.layer_norm2(x))

    def watch_cls_row(report):
        pending = {}

        def record(slot, value):  # hooks on q_proj and k_proj outputs; the second to run completes the layer
            pending[slot] = value
            if len(pending) == 2:
                report(cls_row(split_heads(pending.pop("q"), heads), split_heads(pending.pop("k"), heads), attn.scale))

        return [attn.q_proj.register_forward_hook(lambda module, args, out: record("q", out[:, :1])),
                attn.k_proj.register_forward_hook(lambda module, args, out: record("k", out))]

    return VisionBlock(attention, mlp, attn.scale, watch_cls_row)
