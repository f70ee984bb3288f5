"""Reversible, instance-only patches that make existing models use clipfast's kernels.

    handle = clipfast.integrations.patch_hf_clip(model)   # transformers.CLIPModel: fused return_loss
    ...
    handle.unpatch()                                        # or use the handle as a context manager

Each patch acts on the given instance only (never on a class, a module or torch itself) and returns
a :class:`PatchHandle` that restores it. ``clipfast.integrations.open_clip.create_loss(args)`` is the
drop-in for open_clip's ``create_loss`` in open_clip's training script.
"""

from clipfast.integrations._handle import PatchHandle
from clipfast.integrations.hf_clip import patch_hf_clip
from clipfast.integrations.open_clip import patch_open_clip
from clipfast.integrations.timm_vit import patch_timm_vit
from clipfast.integrations.token_reduction import TokenMedoids, TokenMerging, TokenRemoval, VisionPatchHandle

__all__ = ["PatchHandle", "TokenMedoids", "TokenMerging", "TokenRemoval", "VisionPatchHandle", "patch_hf_clip", "patch_open_clip",
           "patch_timm_vit"]
