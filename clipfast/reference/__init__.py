"""Pure-PyTorch references: the specification of every clipfast op, float64-capable."""

from clipfast.reference.contrastive import clip_loss_reference, siglip_loss_reference

__all__ = ["clip_loss_reference", "siglip_loss_reference"]
