"""Contrastive losses across ranks (torch.distributed: gloo on CPUs, NCCL on GPUs), each rank's loss
from the fused single-device ops, never B × N logits:

    loss = mmfast.distributed.clip_loss(image_features, text_features, logit_scale)   # the ring
    loss = mmfast.distributed.clip_loss(..., strategy="gather", local_loss=True, gather_with_grad=True)
    loss = mmfast.distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias)

strategy "ring" keeps per-rank memory flat in the world size; "gather" is open_clip's all-gather.
"""
from mmfast.distributed.losses import SIGLIP_IMPLS, STRATEGIES, clip_loss, infonce_loss, siglip_loss

__all__ = ["SIGLIP_IMPLS", "STRATEGIES", "clip_loss", "infonce_loss", "siglip_loss"]
