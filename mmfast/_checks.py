"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Scalar = Union[float, int, torch.Tensor]
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def is_real(v) -> bool:
    """A Python or NumPy real number (float, int, np.float32, np.int64, …), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def plain_autograd(op: str) -> None:
    """The ops' gradients are registered for torch.autograd; torch.func's transforms (grad, vmap,
    jacrev, …) cannot run them, and say so only in terms of torch internals."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            f"mmfast.{op} does not support torch.func transforms (grad, vmap, jacrev, …); compute its gradients "
            f"with loss.backward() or torch.autograd.grad")


def checking_values() -> bool:
    """Value checks (scale > 0, labels in range) read tensor data; they are skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


def features(name: str, t, like: Optional[torch.Tensor] = None, like_name: str = "") -> torch.Tensor:
    """A (rows, D) float32/bfloat16/float16 tensor, D ≥ 1; with `like`, the same dtype, device and D."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no features (D = 0), got shape {tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")
        same_device(name, t, like_name, like)
        if t.shape[1] != like.shape[1]:
            raise ValueError(
                f"{name} must have the feature size D={like.shape[1]} of {like_name}, got D={t.shape[1]}"
            )
    return t


def nonempty(name: str, t: torch.Tensor) -> None:
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows); expected at least one")


def scalar(name: str, v: Scalar, device: torch.device, *, positive: bool) -> torch.Tensor:
    """A real number (Python or NumPy) or a tensor of shape [] or [1] → a tensor on `device` (the
    caller's, if it was one).

    positive: the value must be finite and > 0 (a logit scale); otherwise only finite (a bias).
    """
    if not (is_real(v) or isinstance(v, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape [] or [1], got {type(v).__name__}")
    if isinstance(v, torch.Tensor):
        if v.shape not in ((), (1,)):
            raise ValueError(f"{name} must have shape [] or [1], got {list(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} must be on the features' device ({device}), got {v.device}")
        t = v
    else:
        t = torch.tensor(_as_float(v), dtype=torch.float32, device=device)
    if checking_values():
        x = float(t.detach())
        if positive and not (math.isfinite(x) and x > 0):
            raise ValueError(f"{name} must be finite and > 0 (it is used as given, not exponentiated), got {x}")
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
    return t


def _as_float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond the float range
        return math.inf if v > 0 else -math.inf


def choice(name: str, v, allowed) -> None:
    if v not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {v!r}")


def smoothing(v) -> float:
    if not is_real(v) or not 0.0 <= v < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {v!r}")
    return float(v)


def same_device(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {t.device}")


def reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def tensor_2d_or_3d(name: str, t) -> torch.Tensor:
    """A float32/bfloat16/float16 tensor of shape (T, K) or (B, S, K)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be (T, K) or (B, S, K), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return t
