"""Public masked-LM losses: argument checks, the kept-row targets, and the reduction.

Semantics are F.cross_entropy's (mean over the rows whose target is kept, label smoothing as
torch), plus z_loss: z·lse² per kept row (design.md §1.3). A batch with every target ignored gives
0 and zero gradients (torch gives NaN). Inputs may be (T, ·) or (B, S, ·); reduction "none" returns
the target's shape, 0 at ignored positions.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from mmfast import _backends, _checks
from mmfast.cross_entropy import op, reference

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    inplace_backward: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Cross-entropy of logits (T, V) or (B, S, V) against target (T,) or (B, S), fused: one pass
    for the loss, one for the gradient, no softmax buffer.

    inplace_backward=True writes the gradient over `logits` in backward, so the loss needs no
    T×V memory of its own; `logits` is then consumed (it must be contiguous and used by nothing
    else that needs it in backward: autograd raises if something does).
    """
    _checks.plain_autograd("cross_entropy")
    x = _logits_arg(logits)
    vocab = x.shape[-1]
    y = _target_arg(target, x, "logits", vocab, ignore_index)
    eps, z = _loss_options(label_smoothing, z_loss, reduction)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and not x.is_contiguous():
        raise ValueError("inplace_backward=True writes the gradient over logits, which must then be contiguous")
    name = _backends.select(backend, x.device)
    x2, y2 = x.reshape(-1, vocab), _kernel_targets(y.reshape(-1), ignore_index)
    if name == "reference":
        rows = reference.cross_entropy_rows(x2, y2, eps, z)
    else:
        rows = op.cross_entropy(x2, y2, eps, z, inplace_backward, name)
    return _reduce(rows, y2, reduction, y.shape)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Cross-entropy of hidden·weightᵀ + bias against target, computed only for the rows whose
    target is kept and never holding the (T, V) logits.

    hidden: (T, Dh) or (B, S, Dh), weight: (V, Dh), bias: (V,) or None, target: (T,) or (B, S).
    Gradients for hidden, weight (accumulated in fp32) and bias. For a scalar loss (reduction mean
    or sum) whose gradient is wanted, the `cpu` and `torch` backends form the gradients in the
    forward pass from the same logits (6·T_kept·V·Dh FLOPs) and hold them until backward;
    otherwise the backward recomputes the logits tile by tile (8·T_kept·V·Dh in all).
    """
    _checks.plain_autograd("linear_cross_entropy")
    h = _checks.tensor_2d_or_3d("hidden", hidden)
    if h.shape[-1] == 0:
        raise ValueError(f"hidden has hidden size Dh = 0 (shape {tuple(h.shape)}); expected Dh ≥ 1")
    w = _checks.features("weight", weight)
    _same_dtype_device("weight", w, h)
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be (V, Dh) with Dh = {h.shape[-1]} (hidden's last dim), got {tuple(w.shape)}")
    vocab = w.shape[0]
    if vocab == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (vocab,):
            raise ValueError(f"bias must be a tensor of shape ({vocab},) (one per row of weight), "
                             f"got {getattr(bias, 'shape', type(bias).__name__)}")
        _same_dtype_device("bias", bias, h)
    y = _target_arg(target, h, "hidden", vocab, ignore_index)
    eps, z = _loss_options(label_smoothing, z_loss, reduction)
    name = _backends.select(backend, h.device)
    h2, y2 = h.reshape(-1, h.shape[-1]), _kernel_targets(y.reshape(-1), ignore_index)
    if name == "reference":
        return _reduce(reference.linear_cross_entropy_rows(h2, w, bias, y2, eps, z), y2, reduction, y.shape)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h2, w, bias))
    if reduction != "none" and wants_grad and name in op.FUSED:
        kept = (y2 >= 0).float()
        row_weight = kept / kept.sum().clamp_min(1.0) if reduction == "mean" else kept
        return op.linear_cross_entropy_fused(h2, w, bias, y2, row_weight, eps, z, name)[0]
    rows = op.linear_cross_entropy(h2, w, bias, y2, eps, z, name)[0]
    return _reduce(rows, y2, reduction, y.shape)


def _same_dtype_device(name: str, t: Tensor, h: Tensor) -> None:
    if t.dtype != h.dtype:
        raise TypeError(f"{name} must have hidden's dtype ({h.dtype}), got {t.dtype}")
    _checks.same_device(name, t, "hidden", h)


def _logits_arg(logits) -> Tensor:
    x = _checks.tensor_2d_or_3d("logits", logits)
    if x.shape[-1] == 0:
        raise ValueError("logits has no classes (V = 0)")
    return x


def _target_arg(target, like_tensor: Tensor, like: str, vocab: int, ignore_index: int) -> Tensor:
    """An integer tensor of the input's leading dims, on its device, with values in [0, V) or ignore_index."""
    shape = like_tensor.shape[:-1]
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"target must have shape {tuple(shape)} ({like}'s leading dims), got {tuple(target.shape)}")
    _checks.same_device("target", target, like, like_tensor)
    if not (_checks.is_real(ignore_index) and isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    lo, hi = _checks.INT64_RANGE
    if not lo <= ignore_index <= hi:
        raise ValueError(f"ignore_index must fit in int64 ([{lo}, {hi}]), got {ignore_index}")
    if _checks.checking_values() and target.numel() > 0:
        t = target.long()  # int32 targets against an ignore_index beyond int32
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
        if bool(bad.any()):
            first = t[bad][0].item()
            raise ValueError(f"target values must be in [0, {vocab}) or ignore_index={ignore_index}; got {first}")
    return target


def _loss_options(label_smoothing, z_loss, reduction):
    eps = _checks.smoothing(label_smoothing)
    if not _checks.is_real(z_loss) or not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite float ≥ 0, got {z_loss!r}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    return eps, float(z_loss)


def _kernel_targets(y: Tensor, ignore_index: int) -> Tensor:
    """int64 targets with −1 for an ignored row, as every backend takes them."""
    y = y.long()
    return torch.where(y == ignore_index, -1, y)


def _reduce(rows: Tensor, y: Tensor, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (y >= 0).sum().clamp_min(1)
