"""Shared test helpers: backends that run here, tolerances by dtype, gradients of a loss."""
from __future__ import annotations

import pytest
import torch

from mmfast import _backends

RUNNABLE = [b for b in _backends.BACKENDS if _backends.unavailable_reason(b, torch.device("cpu")) is None]
FUSED = [b for b in RUNNABLE if b != "reference"]


def backend_params(names=_backends.BACKENDS):
    """pytest params for backends; those that cannot run here are skipped with the reason."""
    out = []
    for name in names:
        reason = _backends.unavailable_reason(name, torch.device("cpu"))
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# Quantities that are ~0 by cancellation of O(1) terms (the loss of a single pair, the scale
# gradient of a nearly solved batch) carry the terms' fp32 roundoff: below this norm, errors are
# measured against it, i.e. absolutely at tolerance × 0.1.
NORM_FLOOR = 0.1


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / max(‖ref‖, NORM_FLOOR), in float64."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(NORM_FLOOR)).item()


FP32_TOL = 1e-5


def loss_and_grads(fn, tensors):
    """Runs fn(*tensors) on leaf copies that require grad → [loss, grad of each tensor]."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    return [loss] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def features(n, d, dtype=torch.float32, normalize=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    return x.to(dtype)
