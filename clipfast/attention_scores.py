"""[CLS]-attention scores of a ViT: the patch-importance signal of Attentive Mask CLIP (A-CLIP).

A-CLIP ranks the patches of an image by how much the [CLS] token (token 0) attends to them,
averaged over all L layers and H heads of a vision tower::

    p[l, b, h, :] = softmax_j( scale * q[l, b, h, 0] . k[l, b, h, j] )      over all N keys j
    score[b, j]   = 1/(L H) * sum_{l, h} p[l, b, h, P + j]                    j = 0 .. N - P - 1

with P the number of prefix tokens ([CLS] and any register tokens): the softmax runs over every key,
prefix included, and only then are the P prefix columns dropped, so each row of ``score`` sums to
one minus the mean attention mass on the prefix.

A-CLIP materialises this as every block's full map ``softmax(q k^T * scale)`` of shape
[B, H, N, N], stacked over layers ([L, B, H, N, N], 1.4 GB for ViT-B/16 at B = 64) and then sliced
to row 0. Only that row is needed: ``q[:, :, :1]`` against ``k`` is O(B H N Dh) work and memory per
layer, and every block keeps its own fused attention for its outputs.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipfast.dtypes import compute_dtype

__all__ = ["attention_scores", "cls_attention_scores"]

_SUPPORTED = ("open_clip VisionTransformer (or an open_clip model with .visual), timm VisionTransformer, "
              "transformers CLIPVisionModel / CLIPVisionTransformer (or a model with .vision_model)")


def cls_attention_scores(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                         num_prefix_tokens: int = 1) -> torch.Tensor:
    """Head-averaged attention of the [CLS] query (token 0) on the patch tokens of one layer.

    ``score[b, j] = 1/H * sum_h softmax_j'(scale * q[b, h, 0] . k[b, h, j'])[P + j]`` with the
    softmax over all N keys and P = ``num_prefix_tokens`` prefix columns dropped afterwards. Only
    the [CLS] row is computed (``q[:, :, :1]`` against ``k``): O(B H N Dh), no N x N buffer.

    Args:
        q, k: (B, H, N, Dh) queries and keys of one attention layer, any floating dtype (same shape).
        scale: logit scale; defaults to ``Dh ** -0.5``.
        num_prefix_tokens: P, the leading non-patch tokens ([CLS] first), 1 <= P < N.

    Returns:
        (B, N - P) scores, computed and returned in float32 (float64 if q or k is float64).

    Raises:
        ValueError: q, k not 4-D, of different shapes, not floating point, or P outside [1, N).
        RuntimeError: q or k requires grad while grad mode is on. The scores are a selection signal
            (A-CLIP takes them detached) and have no backward: call this under
            ``torch.no_grad()`` or pass detached tensors.
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, H, N, Dh) with the same shape; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point; got {q.dtype} and {k.dtype}")
    n = q.shape[2]
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or not 1 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be an int in [1, N) = [1, {n}); got {num_prefix_tokens!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("cls_attention_scores has no backward: call it under torch.no_grad() or pass "
                           "detached q and k")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return cls_row(q[:, :, :1], k, scale)[:, num_prefix_tokens:]


def cls_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax row ``1/H sum_h softmax_j(scale * q_cls[b, h] . k[b, h, j])``: (B, N).

    q_cls (B, H, 1, Dh), k (B, H, N, Dh); float32 math, float64 if either input is float64.
    """
    dtype = compute_dtype(torch.promote_types(q_cls.dtype, k.dtype))
    logits = torch.matmul(q_cls.to(dtype), k.to(dtype).transpose(-1, -2))  # (B, H, 1, N)
    return _head_mean_softmax(logits[:, :, 0], scale)


def _head_mean_softmax(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, N) [CLS] logits -> (B, N) softmax over the keys, averaged over heads."""
    return (logits * scale).softmax(-1).mean(1)


def linear_key_cls_row(x_cls: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], heads: int, scale: float) -> torch.Tensor:
    """``cls_row`` for attention whose keys are a plain linear map of its input, without forming k.

    With ``q0 = W_q x_cls + b_q`` split into heads and ``k_j = W_k x_j + b_k``, per head h::

        q0_h . k_hj = (W_kh^T q0_h) . x_j + q0_h . b_kh

    The second term is the same for every key j and cancels in the softmax, so the logits are
    ``u_h . x_j`` with ``u_h = W_kh^T q0_h``: O(B D^2 + B H N D) instead of the O(B N D^2) GEMM
    that would recompute the keys the fused attention already computed internally.

    Args:
        x_cls: (B, 1, D) input of the [CLS] query; x: (B, N, D) inputs of the keys.
        weight: (3D, D) packed [W_q; W_k; W_v]; bias: (3D,) or None.
    """
    dim = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    q0 = F.linear(x_cls, weight[:dim], None if bias is None else bias[:dim])  # (B, 1, D)
    q0 = q0.reshape(q0.shape[0], heads, dim // heads).to(dtype)
    u = torch.einsum("bhe,hed->bhd", q0, weight[dim:2 * dim].to(dtype).reshape(heads, dim // heads, dim))
    # One (H x D) @ (D x N) product per image; a broadcast matmul against x[:, None] would copy x per head.
    return _head_mean_softmax(torch.bmm(u, x.to(dtype).transpose(1, 2)), scale)


class _LayerSum:
    """Running sum over layers of the head-mean [CLS] rows (B, N) that the hooks report."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.layers = 0

    def add(self, row: torch.Tensor) -> None:
        self.total = row if self.total is None else self.total + row
        self.layers += 1


def attention_scores(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A-CLIP's patch scores: [CLS]-to-patch attention averaged over all layers and heads.

    ``score[b, j] = 1/(L H) sum_{l,h} softmax_j'(scale * q[l,b,h,0] . k[l,b,h,j'])[P + j]`` (the
    softmax over all N tokens, prefix included; see the module docstring), from ONE forward of the
    tower under ``torch.no_grad()``. Every block keeps its own (fused / SDPA) attention for its
    outputs; forward hooks registered on this instance's attention submodules compute the [CLS]
    row of each layer from that layer's q and k, and are removed when the call returns or raises.

    Supported towers (detected by structure), with exactly the blocks that EViT token removal
    (``TokenRemoval.self_attention``) supports too, as :mod:`clipfast.integrations.vision_blocks`
    describes both:

    - open_clip ``VisionTransformer`` (``model.visual``, or the open_clip model itself): a pre-hook
      on each ``resblocks[i].attn`` (``nn.MultiheadAttention``, or open_clip's ``Attention`` with
      or without qk-norm) reads its input; q of the [CLS] token comes from ``in_proj_weight``, and
      the keys are never formed (see ``linear_key_cls_row``) unless qk-norm needs them.
    - timm ``VisionTransformer`` with a class token (``Block`` with timm's ``Attention``): a hook on
      each ``blocks[i].attn.qkv`` takes q and k from its output (no extra projection), then
      ``q_norm`` / ``k_norm``; P is ``model.num_prefix_tokens`` (class and register tokens).
    - transformers ``CLIPVisionModel`` (5.x), ``CLIPVisionTransformer`` (4.x), or any model with a
      ``.vision_model`` (``CLIPModel``, ``CLIPVisionModelWithProjection``): hooks on each layer's
      ``self_attn.q_proj`` and ``k_proj`` outputs.

    The module's training flag is left as it is (a training-mode tower gives training-mode scores:
    e.g. stochastic depth changes the hidden states the later layers see); only gradients are off.
    The scores are the softmax probabilities before any attention dropout.

    Args:
        visual: the vision tower, or a model holding it (see above).
        images: (B, C, H_img, W_img) input of the tower, in the dtype and device it expects.

    Returns:
        (B, num_patches) float32 scores, in patch order.

    Raises:
        TypeError: ``visual`` is none of the supported towers, has no class token (timm
            ``class_token=False``, SigLIP), or one of its blocks is not a supported block or holds an
            attention variant that cannot be read (scaled-cosine, extra key tokens, differential
            attention, ...): the same error EViT token removal raises for that block.
        ValueError: token dropping (patch dropout in training mode) is active: the scores would
            describe a random subset of the patches; call ``.eval()`` or set its probability to 0.
        RuntimeError: the forward ran a different number of attention layers than the tower has.
    """
    tower = _supported_tower(visual)
    blocks = [tower.block(i) for i in range(len(tower.blocks))]  # every block checked before any hook exists
    layer_sum = _LayerSum()
    with contextlib.ExitStack() as hooks, torch.no_grad():
        for block in blocks:
            for handle in block.watch_cls_row(layer_sum.add):
                hooks.enter_context(handle)
        tower.run(images)
    expected = len(blocks)
    if layer_sum.total is None or layer_sum.layers != expected:
        raise RuntimeError(f"the forward of {type(tower.module).__name__} ran {layer_sum.layers} attention layers, "
                           f"expected one per block ({expected}); blocks skipped or repeated are not supported")
    return (layer_sum.total / expected)[:, tower.num_prefix_tokens:].float().contiguous()


def _supported_tower(visual):
    """The ``VisionTower`` description of ``visual`` if attention scores can be read from it, else TypeError
    (ValueError for active token dropping)."""
    if not isinstance(visual, nn.Module):
        raise TypeError(f"attention_scores needs a vision tower module ({_SUPPORTED}); got {type(visual).__name__}")
    # Imported here: clipfast.integrations imports this module (cls_attention_scores) when it loads.
    from clipfast.integrations import vision_blocks

    tower = vision_blocks.find_tower(visual)
    if tower is None:
        raise TypeError(f"attention_scores supports {_SUPPORTED}; {type(visual).__name__} matches none of them")
    if not tower.has_class_token:  # e.g. SigLIP: token 0 is a patch
        raise TypeError(f"{type(tower.module).__name__} has no class token: there is no [CLS] attention to score")
    drop = tower.embedding_output
    if drop.training and getattr(drop, "prob", 0.0) > 0:
        where = f"{type(tower.module).__name__}.{tower.embedding_output_path}"
        raise ValueError(f"{where} drops tokens in training mode (prob {drop.prob}), so the scores would cover a "
                         f"random subset of the patches; call .eval() on the tower or set {where}.prob = 0 first")
    return tower
