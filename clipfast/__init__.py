"""clipfast: fused kernels for CLIP-style vision-language models.

    import clipfast
    loss = clipfast.clip_loss(image_features, text_features, logit_scale)   # open_clip's numbers, O(N*D) memory
    loss_fn = clipfast.nn.ClipLoss()                                          # drop-in for open_clip.ClipLoss
    handle = clipfast.patch_hf_clip(hf_model)                                 # transformers CLIPModel, reversible

Importing clipfast never touches a device. The native library loads if it was built; otherwise a
warning says why and the CPU ops run their reference kernels (``python -m clipfast.info``).
"""

import torch  # noqa: F401  (torch must be loaded before the native library: shared OpenMP runtime)

from clipfast import backends, ops  # noqa: F401  (ops registers torch.ops.clipfast.*)
from clipfast import distributed, nn
from clipfast.attention_scores import attention_scores, cls_attention_scores
from clipfast.backends import BackendUnavailableError, use_backend
from clipfast.functional import (attentive_token_keep, clip_distill_loss, clip_loss, contrastive_cross_entropy,
                                 distill_cross_entropy, num_keep_for_ratio, segment_medoids, siglip_loss,
                                 token_medoids, token_merge)
from clipfast.integrations import (PatchHandle, TokenMedoids, TokenMerging, TokenRemoval, patch_hf_clip,
                                  patch_open_clip, patch_timm_vit)
from clipfast.spectral_medoids import spectral_embedding, spectral_token_medoids
from clipfast.schur_covariance import (SchurComplement, defocus, exact_gaussian_schur, renyi_scores, rff_omegas,
                                       sce_score, schur_complement)

__version__ = "0.1.0"

__all__ = [
    "attention_scores",
    "attentive_token_keep",
    "BackendUnavailableError",
    "PatchHandle",
    "TokenMedoids",
    "TokenMerging",
    "TokenRemoval",
    "SchurComplement",
    "backends",
    "distributed",
    "exact_gaussian_schur",
    "clip_distill_loss",
    "clip_loss",
    "cls_attention_scores",
    "contrastive_cross_entropy",
    "defocus",
    "distill_cross_entropy",
    "nn",
    "num_keep_for_ratio",
    "patch_hf_clip",
    "patch_open_clip",
    "patch_timm_vit",
    "renyi_scores",
    "rff_omegas",
    "sce_score",
    "schur_complement",
    "segment_medoids",
    "siglip_loss",
    "spectral_embedding",
    "spectral_token_medoids",
    "token_medoids",
    "token_merge",
    "use_backend",
]
