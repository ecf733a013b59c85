"""Drop-in replacements for open_clip's ClipLoss and SigLipLoss (same constructor and forward).

With world_size > 1 they compute each rank's loss over the default process group, as open_clip's
do, through mmfast.distributed: ClipLoss gathers as open_clip (its local_loss × gather_with_grad
modes), or with dist_impl="ring" (keyword) passes feature blocks around the ranks instead, for
local_loss=True, gather_with_grad=True; SigLipLoss takes open_clip's dist_impl values and "ring".
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor, nn

from mmfast import distributed
from mmfast.contrastive import clip_loss, siglip_loss


def _world(rank: int, world_size: int) -> None:
    """world_size > 1 must be the default process group's, with this process's rank."""
    if world_size == 1:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs an initialised default process group "
                         f"(torch.distributed.init_process_group)")
    if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the default process group's "
                         f"({dist.get_rank()}, {dist.get_world_size()})")


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss without the N×N logits. forward(image_features (N, D), text_features
    (N, D), logit_scale, logit_bias=None, output_dict=False) → scalar, or {"contrastive_loss": loss}.
    dist_impl (keyword): None (open_clip's all-gather) or "ring" (needs local_loss and
    gather_with_grad, the values it computes)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, dist_impl: Optional[str] = None,
                 backend: Optional[str] = None):
        super().__init__()
        _world(rank, world_size)
        if use_horovod:
            raise ValueError("use_horovod is not supported: mmfast runs on torch.distributed")
        if dist_impl not in (None, "gather", "ring"):
            raise ValueError(f"dist_impl must be None, 'gather' or 'ring', got {dist_impl!r}")
        if dist_impl == "ring" and not (local_loss and gather_with_grad):
            raise ValueError("dist_impl='ring' computes open_clip's local_loss=True, gather_with_grad=True mode: "
                             "pass both")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.dist_impl = dist_impl or "gather"

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed.clip_loss(image_features, text_features, logit_scale, logit_bias=logit_bias,
                                         strategy=self.dist_impl, local_loss=self.local_loss,
                                         gather_with_grad=self.gather_with_grad, backend=self.backend)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias=logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss without the N×N logits. forward(image_features (N, D), text_features
    (N, D), logit_scale, logit_bias, output_dict=False) → scalar, or {"contrastive_loss": loss}.
    dist_impl: open_clip's "bidir" (its default), "shift", "reduce", "gather", or "ring"."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: Optional[str] = None):
        super().__init__()
        _world(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in distributed.SIGLIP_IMPLS:
            raise ValueError(f"dist_impl must be one of {tuple(distributed.SIGLIP_IMPLS)} or None, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                           dist_impl=self.dist_impl, backend=self.backend)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
