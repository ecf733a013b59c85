"""torch.nn modules over mmfast's ops."""
from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.cross_entropy import LinearCrossEntropyLoss, MaskedLMHead

__all__ = ["ClipLoss", "LinearCrossEntropyLoss", "MaskedLMHead", "SigLipLoss"]
