"""Drop-in modules with the constructor and forward signatures of the modules they replace."""

from clipfast.nn.contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
