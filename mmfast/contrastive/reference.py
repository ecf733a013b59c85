"""The `reference` backend: the losses written the obvious way, with the full (N, M) logits.

The baseline in benchmarks (it is what open_clip does) and a second opinion in tests. It computes
in fp32 (fp64 if given fp64), so it is exact up to that precision, and holds N×M memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast._checks import reduce


def _logits(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    dtype = torch.promote_types(a.dtype, torch.float32)
    z = scale.to(dtype).reshape(()) * (a.to(dtype) @ b.to(dtype).T)
    return z + bias.to(dtype).reshape(()) if bias is not None else z


def clip_loss(a, b, scale, bias, label_smoothing: float, reduction: str) -> Tensor:
    z = _logits(a, b, scale, bias)
    target = torch.arange(z.shape[0], device=z.device)
    per_image = F.cross_entropy(z, target, label_smoothing=label_smoothing, reduction="none")
    per_text = F.cross_entropy(z.T, target, label_smoothing=label_smoothing, reduction="none")
    return reduce(0.5 * (per_image + per_text), reduction)


def infonce_loss(q, keys, scale, labels, negatives, label_smoothing: float, reduction: str) -> Tensor:
    all_keys = keys if negatives is None else torch.cat([keys, negatives])
    z = _logits(q, all_keys, scale, None)
    return reduce(F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction="none"), reduction)


def siglip_loss(a, b, scale, bias) -> Tensor:
    z = _logits(a, b, scale, bias)
    signs = 2 * torch.eye(z.shape[0], z.shape[1], device=z.device, dtype=z.dtype) - 1
    return -F.logsigmoid(signs * z).sum() / z.shape[0]

