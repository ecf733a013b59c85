"""Drop-in replacements for open_clip's ClipLoss and SigLipLoss (same constructor and forward).

Only world_size == 1 is supported for now; the distributed variants are a later step.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mmfast.contrastive import clip_loss, siglip_loss


def _single_process(world_size: int) -> None:
    if world_size != 1:
        raise ValueError(
            f"world_size must be 1 for now (distributed contrastive losses are not implemented yet), got {world_size}"
        )


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss without the N×N logits. forward(image_features (N, D), text_features
    (N, D), logit_scale, logit_bias=None, output_dict=False) → scalar, or {"contrastive_loss": loss}.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _single_process(world_size)
        if use_horovod:
            raise ValueError("use_horovod is not supported")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias=logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss without the N×N logits. forward(image_features (N, D), text_features
    (N, D), logit_scale, logit_bias, output_dict=False) → scalar, or {"contrastive_loss": loss}.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: Optional[str] = None):
        super().__init__()
        _single_process(world_size)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
