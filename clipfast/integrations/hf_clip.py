"""``patch_hf_clip``: Hugging Face ``transformers.CLIPModel`` with clipfast's fused contrastive loss.

Checked against transformers 5.24, whose ``CLIPModel.forward`` L2-normalises the projected pooled
embeddings, builds ``logits_per_text = text_embeds @ image_embeds.T * logit_scale.exp()`` (no bias),
``logits_per_image = logits_per_text.T``, and with ``return_loss=True`` takes the mean of the two
cross-entropies of those (N, N) logits against ``arange(N)``. That is exactly
:func:`clipfast.clip_loss` of the normalised embeddings with ``logit_scale.exp()``.
"""

from __future__ import annotations

import inspect
import types

from clipfast.functional import clip_loss
from clipfast.integrations import token_reduction as reduction
from clipfast.integrations import vision_blocks
from clipfast.integrations.token_reduction import VisionPatchHandle

# CLIPModel.forward's parameters up to return_loss, which callers may also pass positionally.
_LEADING_PARAMETERS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss")
_RETURN_LOSS_INDEX = _LEADING_PARAMETERS.index("return_loss")

# Instance attribute holding the forward that was in place before the patch. Kept on the instance
# rather than in a closure so that copy.deepcopy(model) (EMA copies, ...) rebinds it to the copy.
_ORIGINAL_FORWARD_ATTR = "_clipfast_original_forward"


def patch_hf_clip(model, *, token_removal=None, token_merging=None) -> VisionPatchHandle:
    """Compute ``CLIPModel``'s ``return_loss=True`` loss with :func:`clipfast.clip_loss`, and optionally
    reduce the vision tower's tokens.

    What is patched: only the given instance's ``forward`` (an instance attribute bound with
    ``types.MethodType``, plus two bookkeeping attributes). ``CLIPModel``, its module, other instances,
    submodules, weights, hooks and ``torch.nn.functional`` are untouched.

    What changes: with ``return_loss=True`` the original forward runs with ``return_loss=False`` and
    ``loss`` is then ``clip_loss(image_embeds, text_embeds, model.logit_scale.exp())`` from its
    normalised ``image_embeds``/``text_embeds`` (N, D), instead of two cross-entropies over the
    (N, N) logits: the same value and gradients, up to float rounding. Every other output
    (``logits_per_image``, ``logits_per_text``, ``text_embeds``, ``image_embeds``,
    ``text_model_output``, ``vision_model_output``), every argument (``attention_mask``,
    ``position_ids``, ``interpolate_pos_encoding``, ``output_attentions``, ``output_hidden_states``,
    ``return_dict``, ...) and the tuple form (``return_dict=False``: loss first) are HF's own.
    The loss is float32 for float16/bfloat16 models (clipfast's dtype policy) where HF returns the
    model dtype.

    Memory, honestly: the (N, N) logits are still computed, because they are outputs of
    ``CLIPModel``. What the fused loss saves is the loss's own (N, N) buffers: the two softmaxes
    kept for backward and the gradients of the logits.

    Token removal (``token_removal``, a :class:`~clipfast.integrations.token_reduction.TokenRemoval`):
    ``given_scores`` hooks the vision tower's ``embeddings`` (its output is [CLS] + patches with their
    positional embeddings) and keeps the patches chosen by ``handle.keep_scores(scores)``;
    ``self_attention`` replaces the chosen ``encoder.layers[i].forward`` (attention through SDPA from the
    layer's own projections, EViT's reduction, then the MLP), for the layers :func:`clipfast.attention_scores`
    reads too (:mod:`clipfast.integrations.vision_blocks`). Both transformers 5 (``vision_model`` is a
    ``CLIPVisionModel``) and 4 (``vision_model`` holds the transformer directly) layouts are found.

    Token merging (``token_merging``, a :class:`~clipfast.integrations.token_reduction.TokenMerging`, ToMe):
    from the first layer that merges on, ``encoder.layers[i].forward`` runs attention (proportional, as a key
    bias), :func:`clipfast.token_merge` by the layer's keys, then the MLP.

    Args:
        model: a ``transformers.CLIPModel`` instance (subclasses accepted).
        token_removal: None (default) or a ``TokenRemoval``.
        token_merging: None (default) or a ``TokenMerging``; not combined with ``token_removal``.

    Returns:
        A :class:`~clipfast.integrations.token_reduction.VisionPatchHandle`: ``handle.unpatch()`` deletes
        the instance ``forward`` again so ``CLIPModel.forward`` shows through and removes the hooks; it
        is also a context manager.

    Raises:
        ImportError: transformers is not installed.
        TypeError: ``model`` is not a ``CLIPModel``, or its ``forward`` signature is not the one this
            patch was written for.
        RuntimeError: ``model`` is already patched by clipfast.

    Example::

        model = transformers.CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
        handle = clipfast.integrations.patch_hf_clip(model)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        handle.unpatch()                    # or: with patch_hf_clip(model): ...
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("clipfast.integrations.patch_hf_clip needs transformers "
                          "(pip install transformers)") from e
    if not isinstance(model, transformers.CLIPModel):
        raise TypeError(
            "patch_hf_clip expects a transformers.CLIPModel instance (the dual encoder with "
            f"logit_scale and return_loss), found {type(model).__module__}.{type(model).__qualname__}. "
            "CLIPTextModel/CLIPVisionModel(WithProjection) compute no contrastive loss; use "
            "clipfast.clip_loss on their embeddings directly.")
    found = tuple(inspect.signature(type(model).forward).parameters)[1:1 + len(_LEADING_PARAMETERS)]
    if found != _LEADING_PARAMETERS:
        raise TypeError(
            f"{type(model).__qualname__}.forward (transformers {transformers.__version__}) does not start with "
            f"the parameters patch_hf_clip was written for: expected {_LEADING_PARAMETERS}, found {found}")

    reducing = token_removal is not None or token_merging is not None
    tower = vision_blocks.hf_tower(model) if reducing else None
    if reducing and tower is None:
        raise TypeError(f"patch_hf_clip: {type(model.vision_model).__qualname__} has no embeddings / encoder.layers")
    handle = VisionPatchHandle(model, "clipfast.integrations.patch_hf_clip")
    if tower is not None:
        reduction.install(handle, tower, token_removal=token_removal, token_medoids=None, token_merging=token_merging)
    # model.forward is CLIPModel.forward bound to model, or an instance forward already there
    # (e.g. accelerate's device-placement hooks); either way the patch wraps what was called before.
    handle.set(model, _ORIGINAL_FORWARD_ATTR, model.forward)
    handle.set(model, "forward", types.MethodType(_forward_with_fused_loss, model))
    return handle


def _forward_with_fused_loss(self, *args, **kwargs):
    """The patched ``CLIPModel.forward``: HF's forward without its loss, then the fused loss.

    Same arguments and outputs as ``CLIPModel.forward``; ``loss`` is a 0-d tensor when requested.
    """
    if len(args) > _RETURN_LOSS_INDEX:
        return_loss = args[_RETURN_LOSS_INDEX]
        args = args[:_RETURN_LOSS_INDEX] + (False,) + args[_RETURN_LOSS_INDEX + 1:]
    else:
        return_loss = kwargs.pop("return_loss", None)
        kwargs["return_loss"] = False
    outputs = getattr(self, _ORIGINAL_FORWARD_ATTR)(*args, **kwargs)
    if not return_loss:
        return outputs

    if isinstance(outputs, tuple):
        # return_dict=False: CLIPOutput.to_tuple() without the (None) loss, i.e. (logits_per_image,
        # logits_per_text, text_embeds, image_embeds, text_model_output, vision_model_output).
        text_embeds, image_embeds = outputs[2], outputs[3]
    else:
        text_embeds, image_embeds = outputs.text_embeds, outputs.image_embeds
    # HF computes its logits on the text embeddings' device (model-parallel placements); so do we.
    device = text_embeds.device
    loss = clip_loss(image_embeds.to(device), text_embeds, self.logit_scale.exp().to(device))
    if isinstance(outputs, tuple):
        return (loss,) + outputs
    # A fresh CLIPOutput, so that "loss" comes first in keys() and to_tuple() as in HF's own output.
    return type(outputs)(loss=loss, **outputs)
