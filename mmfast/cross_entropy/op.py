"""The masked-LM softmax's registered ops (design.md §1.3).

    cross_entropy(x, y) → loss (T,) fp32          x: (T, V) logits, y: (T,) int64, −1 = ignored
        loss_t = lse_t − (1 − ε)·x_{t,y_t} − ε·mean_v x_tv + z·lse_t²   (0 for an ignored row)
    its backward: the gradient of Σ_t w_t·loss_t,
        g_tv = w_t·(softmax_tv·(1 + 2z·lse_t) − ε/V − (1 − ε)·[v = y_t]),
    into a new tensor, or written over x when inplace_backward (x's memory is reused).

    linear_cross_entropy(h, w, bias, y) → loss (T,) fp32, lse (T,) fp64
        h: (T, Dh), w: (V, Dh), bias: (V,) or None; the logits x = h·wᵀ + bias of the kept rows
        only, in tiles, never T×V (2·T_kept·V·Dh FLOPs).
    its backward recomputes the logits tile by tile with the saved lse and forms dh, dw (accumulated
    in fp32) and dbias (6·T_kept·V·Dh FLOPs): 8·T_kept·V·Dh in all, a few tiles of working memory.

    linear_cross_entropy_fused(h, w, bias, y, row_weight) → (Σ_t row_weight_t·loss_t, dh, dw, dbias)
        the loss and its gradients at once (`cpu` and `torch`): for a scalar loss (reduction mean or
        sum, row_weight = 1/T_kept or 1 on kept rows) whose gradient is wanted, the gradients come
        from the forward's own logits, a block of rows × V at a time (6·T_kept·V·Dh FLOPs). They are
        held until backward, which scales them in place by the incoming gradient: one backward per
        forward (a second raises, saying so).

All are torch.library custom ops with fakes, so torch.compile(fullgraph=True) keeps them whole.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from mmfast._backends import SECOND_ORDER, first_order_only, no_autocast
from mmfast.cross_entropy import chunked


def _cpu_cross_entropy(x, y, eps, z):
    return torch.ops.mmfast.cpu_cross_entropy(x, y, -1, eps, z)


def _cpu_cross_entropy_grad(x, y, row_weight, eps, z, out):
    torch.ops.mmfast.cpu_cross_entropy_grad(x, y, row_weight, -1, eps, z, out)


def _cpu_linear_cross_entropy(h, w, bias, y, eps, z):
    return torch.ops.mmfast.cpu_linear_cross_entropy(h, w, bias, y, -1, eps, z)


def _cpu_linear_cross_entropy_grad(h, w, bias, y, lse, row_weight, eps, z):
    return torch.ops.mmfast.cpu_linear_cross_entropy_grad(h, w, bias, y, lse, row_weight, -1, eps, z)


def _cpu_linear_cross_entropy_fused(h, w, bias, y, row_weight, eps, z):
    return torch.ops.mmfast.cpu_linear_cross_entropy_fused(h, w, bias, y, row_weight, -1, eps, z)


def _lazy(module: str):
    """The four functions of mmfast.cross_entropy.<module>, imported at their first call (triton_kernels
    imports triton; cuda_kernels is imported only once that backend runs, too)."""
    def function(name):
        def call(*args):
            return getattr(importlib.import_module(f"mmfast.cross_entropy.{module}"), name)(*args)

        return call

    return tuple(function(name) for name in ("cross_entropy", "cross_entropy_grad", "linear_cross_entropy",
                                             "linear_cross_entropy_grad"))


# backend → (cross_entropy, cross_entropy_grad, linear_cross_entropy, linear_cross_entropy_grad),
# with the signatures of the chunked.py functions.
FUSED = {"torch": chunked.linear_cross_entropy_fused, "cpu": _cpu_linear_cross_entropy_fused}

IMPLS = {
    "torch": (chunked.cross_entropy, chunked.cross_entropy_grad, chunked.linear_cross_entropy,
              chunked.linear_cross_entropy_grad),
    "cpu": (_cpu_cross_entropy, _cpu_cross_entropy_grad, _cpu_linear_cross_entropy, _cpu_linear_cross_entropy_grad),
    "triton": _lazy("triton_kernels"),
    "cuda": _lazy("cuda_kernels"),
}


# ---- cross_entropy over given logits ---------------------------------------------------------

@torch.library.custom_op("mmfast::cross_entropy", mutates_args=())
def cross_entropy(x: Tensor, y: Tensor, eps: float, z: float, inplace_backward: bool, backend: str) -> Tensor:
    with no_autocast(x):
        loss, _ = IMPLS[backend][0](x, y, eps, z)
    return loss


@cross_entropy.register_fake
def _(x, y, eps, z, inplace_backward, backend):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("mmfast::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(x: Tensor, y: Tensor, row_weight: Tensor, eps: float, z: float, backend: str) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with no_autocast(x):
        IMPLS[backend][1](x, y, row_weight, eps, z, out)
    return out


@cross_entropy_backward.register_fake
def _(x, y, row_weight, eps, z, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mmfast::cross_entropy_backward_", mutates_args=("x",))
def cross_entropy_backward_(x: Tensor, y: Tensor, row_weight: Tensor, eps: float, z: float, backend: str) -> None:
    """The gradient written over the logits x themselves."""
    with no_autocast(x):
        IMPLS[backend][1](x, y, row_weight, eps, z, x)


def _ce_setup(ctx, inputs, output):
    x, y, eps, z, inplace, backend = inputs
    ctx.save_for_backward(x, y)
    ctx.eps, ctx.z, ctx.inplace, ctx.backend = eps, z, inplace, backend


def _ce_backward(ctx, grad_loss):
    x, y = ctx.saved_tensors
    if ctx.inplace:
        cross_entropy_backward_(x, y, grad_loss, ctx.eps, ctx.z, ctx.backend)
        return x, None, None, None, None, None
    return cross_entropy_backward(x, y, grad_loss, ctx.eps, ctx.z, ctx.backend), None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)
first_order_only(cross_entropy_backward, "mmfast.cross_entropy")


# ---- linear + cross_entropy over the kept rows -------------------------------------------------

@torch.library.custom_op("mmfast::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, z: float,
                         backend: str) -> tuple[Tensor, Tensor]:
    with no_autocast(h):
        return IMPLS[backend][2](h, w, bias, y, eps, z)


@linear_cross_entropy.register_fake
def _(h, w, bias, y, eps, z, backend):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float64)


@torch.library.custom_op("mmfast::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, lse: Tensor, row_weight: Tensor, eps: float, z: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """→ dh (T, Dh), dw (V, Dh), dbias (V,) or (0,): the gradients of Σ_t row_weight_t·loss_t."""
    with no_autocast(h):
        return IMPLS[backend][3](h, w, bias, y, lse, row_weight, eps, z)


@linear_cross_entropy_backward.register_fake
def _(h, w, bias, y, lse, row_weight, eps, z, backend):
    db = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0)
    return h.new_empty(h.shape), w.new_empty(w.shape), db


def _lce_setup(ctx, inputs, output):
    h, w, bias, y, eps, z, backend = inputs
    ctx.save_for_backward(h, w, bias, y, output[1])
    ctx.eps, ctx.z, ctx.backend = eps, z, backend
    ctx.set_materialize_grads(False)  # lse's gradient is unused: no zeros for it


def _lce_backward(ctx, grad_loss, grad_lse):
    if grad_loss is None:  # only lse was used: it carries no gradient
        return (None,) * 7
    h, w, bias, y, lse = ctx.saved_tensors
    dh, dw, db = linear_cross_entropy_backward(h, w, bias, y, lse, grad_loss, ctx.eps, ctx.z, ctx.backend)
    return dh, dw, db if bias is not None else None, None, None, None, None


linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)
first_order_only(linear_cross_entropy_backward, "mmfast.linear_cross_entropy")


@torch.library.custom_op("mmfast::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, row_weight: Tensor, eps: float, z: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with no_autocast(h):
        loss, _, dh, dw, db = FUSED[backend](h, w, bias, y, row_weight, eps, z)
    return (loss.double() * row_weight.double()).sum().float(), dh, dw, db


@linear_cross_entropy_fused.register_fake
def _(h, w, bias, y, row_weight, eps, z, backend):
    db = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0)
    return h.new_empty((), dtype=torch.float32), h.new_empty(h.shape), w.new_empty(w.shape), db


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None
    ctx.handed_over = False
    ctx.set_materialize_grads(False)  # else autograd fills zero "gradients" of dh, dw, dbias: 3 more buffers


ONE_BACKWARD = (
    "mmfast.linear_cross_entropy with reduction 'mean' or 'sum' on the cpu and torch backends forms its "
    "gradients in the forward pass and hands them over in one backward: it supports one backward per forward. "
    "For several (retain_graph=True), use reduction='none' and reduce the result yourself: that path "
    "recomputes the logits in each backward.")


def _fused_backward(ctx, grad_loss, *output_grads):
    if any(g is not None for g in output_grads):  # a gradient of the returned gradients: second order
        raise RuntimeError(SECOND_ORDER.format("mmfast.linear_cross_entropy"))
    if grad_loss is None:
        return (None,) * 8
    if ctx.handed_over:
        raise RuntimeError(ONE_BACKWARD)
    ctx.handed_over = True
    dh, dw, db = ctx.saved_tensors
    for g in (dh, dw, db):  # in place: a copy of dW would double the op's memory
        g.mul_(grad_loss.to(g.dtype))
    return dh, dw, db if ctx.has_bias else None, None, None, None, None, None


linear_cross_entropy_fused.register_autograd(_fused_backward, setup_context=_fused_setup)
