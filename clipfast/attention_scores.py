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
from typing import Callable, Optional, Tuple

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
    return _cls_row(q[:, :, :1], k, scale)[:, num_prefix_tokens:]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * Dh) -> (B, H, N, Dh)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _cls_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax row ``1/H sum_h softmax_j(scale * q_cls[b, h] . k[b, h, j])``: (B, N).

    q_cls (B, H, 1, Dh), k (B, H, N, Dh); float32 math, float64 if either input is float64.
    """
    dtype = compute_dtype(torch.promote_types(q_cls.dtype, k.dtype))
    logits = torch.matmul(q_cls.to(dtype), k.to(dtype).transpose(-1, -2))  # (B, H, 1, N)
    return _head_mean_softmax(logits[:, :, 0], scale)


def _head_mean_softmax(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, N) [CLS] logits -> (B, N) softmax over the keys, averaged over heads."""
    return (logits * scale).softmax(-1).mean(1)


def _linear_key_cls_row(x_cls: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], heads: int, scale: float) -> torch.Tensor:
    """``_cls_row`` for attention whose keys are a plain linear map of its input, without forming k.

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

    Supported towers (detected by structure):

    - open_clip ``VisionTransformer`` (``model.visual``, or the open_clip model itself): a pre-hook
      on each ``resblocks[i].attn`` (``nn.MultiheadAttention``, or open_clip's ``Attention`` with
      or without qk-norm) reads its input; q of the [CLS] token comes from ``in_proj_weight``, and
      the keys are never formed (see ``_linear_key_cls_row``) unless qk-norm needs them.
    - timm ``VisionTransformer`` with a class token: a hook on each ``blocks[i].attn.qkv`` takes q
      and k from its output (no extra projection), then ``q_norm`` / ``k_norm``; P is
      ``model.num_prefix_tokens`` (class and register tokens).
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
            ``class_token=False``, SigLIP), or one of its blocks has an attention variant this
            function cannot read (scaled-cosine, extra key tokens, differential attention).
        ValueError: token dropping (patch dropout in training mode) is active: the scores would
            describe a random subset of the patches; call ``.eval()`` or set its probability to 0.
        RuntimeError: the forward ran a different number of attention layers than the tower has.
    """
    tower, install, call, prefix = _resolve(visual)
    layer_sum = _LayerSum()
    with contextlib.ExitStack() as hooks, torch.no_grad():
        expected = install(tower, layer_sum.add, hooks)
        call(tower, images)
    if layer_sum.total is None or layer_sum.layers != expected:
        raise RuntimeError(f"the forward of {type(tower).__name__} ran {layer_sum.layers} attention layers, "
                           f"expected one per block ({expected}); blocks skipped or repeated are not supported")
    return (layer_sum.total / expected)[:, prefix:].float().contiguous()


_Install = Callable[[nn.Module, Callable[[torch.Tensor], None], contextlib.ExitStack], int]


def _resolve(visual) -> Tuple[nn.Module, _Install, Callable, int]:
    """(tower, hook installer, forward call, number of prefix tokens) for a supported model."""
    if not isinstance(visual, nn.Module):
        raise TypeError(f"attention_scores needs a vision tower module ({_SUPPORTED}); got {type(visual).__name__}")
    tower = visual
    # Containers: transformers CLIPModel / CLIPVisionModel 4.x / ...WithProjection, open_clip CLIP.
    while True:
        inner = getattr(tower, "vision_model", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(tower, "visual", None)
        if not isinstance(inner, nn.Module):
            break
        tower = inner
    encoder = getattr(tower, "encoder", None)
    if hasattr(tower, "embeddings") and isinstance(getattr(encoder, "layers", None), nn.ModuleList):
        if not hasattr(tower.embeddings, "class_embedding"):  # e.g. SigLIP: token 0 is a patch
            raise _no_class_token(tower)
        return tower, _install_hf, lambda m, images: m(pixel_values=images), 1
    transformer = getattr(tower, "transformer", None)
    if hasattr(tower, "conv1") and hasattr(tower, "class_embedding") \
            and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList):
        _check_no_token_drop(tower, "patch_dropout")
        return tower, _install_open_clip, lambda m, images: m(images), 1
    if isinstance(getattr(tower, "blocks", None), nn.Sequential) and hasattr(tower, "patch_embed") \
            and hasattr(tower, "num_prefix_tokens"):
        if getattr(tower, "cls_token", None) is None:
            raise _no_class_token(tower)
        _check_no_token_drop(tower, "patch_drop")
        return tower, _install_timm, lambda m, images: m(images), int(tower.num_prefix_tokens)
    raise TypeError(f"attention_scores supports {_SUPPORTED}; {type(visual).__name__} matches none of them")


def _no_class_token(tower: nn.Module) -> TypeError:
    return TypeError(f"{type(tower).__name__} has no class token: there is no [CLS] attention to score")


def _check_no_token_drop(tower: nn.Module, attr: str) -> None:
    drop = getattr(tower, attr, None)
    if drop is not None and drop.training and getattr(drop, "prob", 0.0) > 0:
        raise ValueError(f"{type(tower).__name__}.{attr} drops tokens in training mode (prob {drop.prob}), so the "
                         "scores would cover a random subset of the patches; call .eval() on the tower or set "
                         f"{attr}.prob = 0 first")


def _unsupported(where: str, why: str) -> TypeError:
    return TypeError(f"attention_scores cannot read the [CLS] attention of {where}: {why}")


def _install_open_clip(tower: nn.Module, add, hooks: contextlib.ExitStack) -> int:
    for i, block in enumerate(tower.transformer.resblocks):
        attn = block.attn
        name = f"transformer.resblocks[{i}].attn ({type(attn).__name__})"
        if getattr(attn, "in_proj_weight", None) is None:
            raise _unsupported(name, "it has no packed in_proj_weight (separate q/k/v projections)")
        if isinstance(attn, nn.MultiheadAttention):
            if attn.bias_k is not None or attn.add_zero_attn:
                raise _unsupported(name, "it adds key tokens (add_bias_kv / add_zero_attn)")
            hook = _mha_hook(attn, add)
        elif hasattr(attn, "ln_q") and hasattr(attn, "ln_k") and hasattr(attn, "num_heads"):
            if getattr(attn, "logit_scale", None) is not None:
                raise _unsupported(name, "scaled-cosine attention is not supported")
            hook = _open_clip_attention_hook(attn, add)
        else:
            raise _unsupported(name, "unknown attention class (expected nn.MultiheadAttention or open_clip's "
                                     "Attention)")
        hooks.enter_context(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return len(tower.transformer.resblocks)


def _mha_hook(attn: nn.MultiheadAttention, add):
    heads = attn.num_heads
    scale = (attn.embed_dim // heads) ** -0.5

    def hook(module, args, kwargs):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        add(_linear_key_cls_row(query[:, :1], key, module.in_proj_weight, module.in_proj_bias, heads, scale))

    return hook


def _open_clip_attention_hook(attn: nn.Module, add):
    """open_clip's own ``Attention`` (used with qk-norm and the other custom-block options)."""
    heads = attn.num_heads
    plain = isinstance(attn.ln_q, nn.Identity) and isinstance(attn.ln_k, nn.Identity)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        if plain:
            add(_linear_key_cls_row(x[:, :1], x, module.in_proj_weight, module.in_proj_bias, heads, module.scale))
            return
        # qk-norm is not linear in the input: form q of the [CLS] token and all keys, then normalise.
        batch, n, dim = x.shape
        weight, bias = module.in_proj_weight, module.in_proj_bias
        q0 = F.linear(x[:, :1], weight[:dim], None if bias is None else bias[:dim])
        k = F.linear(x, weight[dim:2 * dim], None if bias is None else bias[dim:2 * dim])
        q0 = module.ln_q(q0.reshape(batch, 1, heads, -1).transpose(1, 2))
        k = module.ln_k(k.reshape(batch, n, heads, -1).transpose(1, 2))
        add(_cls_row(q0, k, module.scale))

    return hook


def _install_timm(tower: nn.Module, add, hooks: contextlib.ExitStack) -> int:
    for i, block in enumerate(tower.blocks):
        attn = getattr(block, "attn", None)
        qkv = getattr(attn, "qkv", None)
        # The width check also rejects look-alikes such as timm's DiffAttention (two maps per head).
        if not (isinstance(qkv, nn.Linear) and all(hasattr(attn, a) for a in ("q_norm", "k_norm", "scale"))
                and qkv.out_features == 3 * getattr(attn, "num_heads", 0) * getattr(attn, "head_dim", 0)):
            raise _unsupported(f"blocks[{i}].attn ({type(attn).__name__})",
                               "expected a fused qkv Linear with 3 x num_heads x head_dim outputs, q_norm and k_norm")
        hooks.enter_context(qkv.register_forward_hook(_timm_qkv_hook(attn, add)))
    return len(tower.blocks)


def _timm_qkv_hook(attn: nn.Module, add):
    heads = attn.num_heads

    def hook(module, args, qkv):
        batch, n, _ = qkv.shape
        qkv = qkv.reshape(batch, n, 3, heads, -1)
        q0 = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, H, 1, Dh)
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, Dh)
        add(_cls_row(q0, k, attn.scale))

    return hook


def _install_hf(tower: nn.Module, add, hooks: contextlib.ExitStack) -> int:
    for i, layer in enumerate(tower.encoder.layers):
        attn = getattr(layer, "self_attn", None)
        if not (isinstance(getattr(attn, "q_proj", None), nn.Linear) and isinstance(getattr(attn, "k_proj", None),
                                                                                    nn.Linear)
                and hasattr(attn, "num_heads") and hasattr(attn, "scale")):
            raise _unsupported(f"encoder.layers[{i}].self_attn ({type(attn).__name__})",
                               "expected q_proj and k_proj Linear layers, num_heads and scale")
        q_hook, k_hook = _hf_hooks(attn, add)
        hooks.enter_context(attn.q_proj.register_forward_hook(q_hook))
        hooks.enter_context(attn.k_proj.register_forward_hook(k_hook))
    return len(tower.encoder.layers)


def _hf_hooks(attn: nn.Module, add):
    """Hooks on q_proj and k_proj outputs; the second of the pair to run completes the layer."""
    heads = attn.num_heads
    pending = {}

    def record(slot, value):
        pending[slot] = value
        if len(pending) == 2:
            add(_cls_row(split_heads(pending.pop("q"), heads), split_heads(pending.pop("k"), heads), attn.scale))

    return (lambda module, args, out: record("q", out[:, :1]),
            lambda module, args, out: record("k", out))
