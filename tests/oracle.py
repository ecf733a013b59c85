"""float64 references written from design.md §1.1's formulas, independent of mmfast's code."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F


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


def infonce_loss(q, keys, scale, labels=None, negatives=None, eps=0.0, reduction="mean"):
    k = keys if negatives is None else torch.cat([keys, negatives])
    labels = torch.arange(q.shape[0]) if labels is None else labels
    return _reduce(_ce(logits(q, k, scale), labels, eps), reduction)


def siglip_loss(a, b, scale, bias):
    z = logits(a, b, scale, bias)
    t = 2 * torch.eye(z.shape[0], z.shape[1], dtype=z.dtype) - 1
    return -F.logsigmoid(t * z).sum() / z.shape[0]


def open_clip_loss_module():
    """open_clip's loss.py loaded on its own (the package imports torchvision), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
