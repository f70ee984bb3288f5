"""Drop-in modules with the constructor and forward signatures of the modules they replace."""

from clipfast.nn.contrastive import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss
from clipfast.nn.schur_covariance import SchurComplementEntropy

__all__ = ["ClipLoss", "CoCaLoss", "DistillClipLoss", "SchurComplementEntropy", "SigLipLoss"]
