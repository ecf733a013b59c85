"""float64 references written from design.md §1.1's formulas, independent of mmfast's code."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.peers import open_clip_loss as open_clip_loss_module  # noqa: F401  (a peer, when installed)


def _scalar(v):
    return torch.as_tensor(v, dtype=torch.float64).reshape(())


def logits(a, b, scale, bias=None):
    z = _scalar(scale) * (a.double() @ b.double().T)
    return z if bias is None else z + _scalar(bias)


def _ce(z, target, eps):
    lse = torch.logsumexp(z, 1)
    return lse - (1 - eps) * z.gather(1, target[:, None])[:, 0] - eps * z.mean(1)


def _reduce(v, reduction):
    return v.mean() if reduction == "mean" else v.sum() if reduction == "sum" else v


def clip_loss(a, b, scale, bias=None, eps=0.0, reduction="mean"):
    z = logits(a, b, scale, bias)
    t = torch.arange(z.shape[0])
    return _reduce(0.5 * (_ce(z, t, eps) + _ce(z.T, t, eps)), reduction)


def eager_clip_loss(a, b, scale):
    """The CLIP loss as PyTorch computes it in the inputs' own dtype (bf16/fp16): not a reference,
    the yardstick of the half-precision tolerance (design.md §4)."""
    z = scale.to(a.dtype) * (a @ b.T)
    t = torch.arange(z.shape[0], device=z.device)
    return 0.5 * (F.cross_entropy(z, t) + F.cross_entropy(z.T, t))


def infonce_loss(q, keys, scale, labels=None, negatives=None, eps=0.0, reduction="mean"):
    k = keys if negatives is None else torch.cat([keys, negatives])
    labels = torch.arange(q.shape[0]) if labels is None else labels
    return _reduce(_ce(logits(q, k, scale), labels, eps), reduction)


def siglip_loss(a, b, scale, bias):
    z = logits(a, b, scale, bias)
    t = 2 * torch.eye(z.shape[0], z.shape[1], dtype=z.dtype) - 1
    return -F.logsigmoid(t * z).sum() / z.shape[0]


def cross_entropy_rows(x, target, ignore_index=-100, eps=0.0, z=0.0):
    """design.md §1.3 per row in float64: lse − (1 − ε)·x_y − ε·mean(x) + z·lse², 0 where ignored."""
    x = x.double()
    kept = target != ignore_index
    y = torch.where(kept, target, 0)
    lse = torch.logsumexp(x, 1)
    loss = lse - (1 - eps) * x.gather(1, y[:, None])[:, 0] + z * lse * lse
    if eps:  # (not 0·mean: a row with −inf logits, a masked vocabulary, has mean −inf)
        loss = loss - eps * x.mean(1)
    return torch.where(kept, loss, 0.0)


def masked_lm_loss(x, target, ignore_index=-100, eps=0.0, z=0.0, reduction="mean"):
    """x: (…, V), target: (…): the mean over kept rows (0 when none is kept), the sum, or per row."""
    rows = cross_entropy_rows(x.reshape(-1, x.shape[-1]), target.reshape(-1), ignore_index, eps, z)
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != ignore_index).sum().clamp_min(1)


def linear_masked_lm_loss(h, w, target, bias=None, **kwargs):
    x = h.double() @ w.double().T
    return masked_lm_loss(x if bias is None else x + bias.double(), target, **kwargs)
