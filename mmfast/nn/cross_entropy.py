"""Masked-LM heads and losses over mmfast.linear_cross_entropy: the (T, V) logits are never formed."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.cross_entropy import linear_cross_entropy


def autocast_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """(hidden, weight, bias) as an nn.Linear computes them: under autocast for hidden's device, all
    three in the autocast dtype (the fp32 weight cast for the call); otherwise unchanged."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class LinearCrossEntropyLoss(nn.Module):
    """loss = mmfast.linear_cross_entropy(hidden, weight, target, bias=bias) with the options fixed
    at construction: hidden (T, Dh) or (B, S, Dh), weight (V, Dh), bias (V,) or None."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                            reduction=reduction, backend=backend)

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(hidden, weight, target, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class MaskedLMHead(nn.Module):
    """The vocabulary projection of a masked-LM head, whose forward returns the loss, not logits.

    forward(hidden (B, S, Dh) or (T, Dh), labels (B, S) or (T,)) → the loss over the positions whose
    label is not ignore_index (−100, as Hugging Face's MLM collators write). logits(hidden) gives
    the (…, V) logits for inference. tied_weight: a (V, Dh) parameter to share (the input
    embedding's, as BERT ties them); otherwise the head owns a weight, initialised like nn.Linear.
    A BERT-style transform (dense + activation + LayerNorm) goes before this module.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, bias: bool = True,
                 tied_weight: Optional[nn.Parameter] = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if tied_weight is not None:
            if tuple(tied_weight.shape) != (vocab_size, hidden_size):
                raise ValueError(f"tied_weight must be ({vocab_size}, {hidden_size}) (vocab_size, hidden_size), "
                                 f"got {tuple(tied_weight.shape)}")
            self.weight = tied_weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype)) if bias else None
        self.loss = LinearCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                           z_loss=z_loss, backend=backend)

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Under autocast the head computes in the autocast dtype, as an nn.Linear would."""
        hidden, weight, bias = autocast_operands(hidden, self.weight, self.bias)
        return self.loss(hidden, weight, labels, bias)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight, self.bias)
