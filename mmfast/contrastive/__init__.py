"""Contrastive losses (design.md §1.1): api → op (registered, differentiable) → backends."""
from mmfast.contrastive.api import clip_loss, infonce_loss, siglip_loss

__all__ = ["clip_loss", "infonce_loss", "siglip_loss"]
