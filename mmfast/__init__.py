"""mmfast: fused kernels for multimodal training.

    loss = mmfast.clip_loss(image_features, text_features, logit_scale)

Every op has the backends of design.md §2 (reference, torch, cpu, triton); `backend=None` picks
one by device. `python -m mmfast info` says which run here.
"""
from mmfast import eval, nn
from mmfast._backends import BACKENDS
from mmfast.contrastive import clip_loss, infonce_loss, siglip_loss
from mmfast.cross_entropy import cross_entropy, linear_cross_entropy
from mmfast.similarity import similarity, topk_similarity

__version__ = "0.1.0"
__all__ = ["BACKENDS", "clip_loss", "cross_entropy", "eval", "infonce_loss", "linear_cross_entropy", "nn",
           "siglip_loss", "similarity", "topk_similarity", "__version__"]
