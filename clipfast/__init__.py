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
from clipfast.backends import BackendUnavailableError, use_backend
from clipfast.functional import (clip_loss, contrastive_cross_entropy, segment_medoids, siglip_loss,
                                 token_medoids)
from clipfast.integrations import PatchHandle, patch_hf_clip
from clipfast.schur import (SchurComplement, defocus, exact_gaussian_schur, renyi_scores, rff_omegas, sce_score,
                            schur_complement)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PatchHandle",
    "SchurComplement",
    "backends",
    "distributed",
    "exact_gaussian_schur",
    "clip_loss",
    "contrastive_cross_entropy",
    "defocus",
    "nn",
    "patch_hf_clip",
    "renyi_scores",
    "rff_omegas",
    "sce_score",
    "schur_complement",
    "segment_medoids",
    "siglip_loss",
    "token_medoids",
    "use_backend",
]
