"""The `reference` backend: the full (T, V) logits and F.cross_entropy, the way a model without
mmfast computes its MLM loss (Hugging Face style). The baseline in benchmarks, a second opinion in
tests; it holds T×V memory. Targets: int64, −1 for an ignored row."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy_rows(x: Tensor, y: Tensor, eps: float, z: float) -> Tensor:
    """x: (T, V), y: (T,) → loss per row (T,) fp32 (fp64 if given fp64), 0 for ignored rows."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    loss = F.cross_entropy(x, y, ignore_index=-1, label_smoothing=eps, reduction="none")
    if z:
        loss = loss + torch.where(y >= 0, z * torch.logsumexp(x, 1) ** 2, 0.0)
    return loss


def linear_cross_entropy_rows(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, z: float) -> Tensor:
    """h: (T, Dh), w: (V, Dh), bias: (V,) or None → loss per row (T,), through the full logits."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    x = F.linear(h.to(dtype), w.to(dtype), bias.to(dtype) if bias is not None else None)
    return cross_entropy_rows(x, y, eps, z)
