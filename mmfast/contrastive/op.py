"""The contrastive family's registered ops: one differentiable primitive and its gradient pass.

    contrastive_stats(a, b, scale, bias, positives) → row (N,), col (M,) in fp64:
        softmax: row_i = logsumexp_j Z_ij, col_j = logsumexp_i Z_ij   (col empty unless with_cols)
        sigmoid: row_i = Σ_j softplus(−t_ij·Z_ij)                       (col empty)
    with Z = scale·a·bᵀ + bias, a: (N, D), b: (M, D), and for sigmoid t_ij = +1 where j is row i's
    positive (positives: (N,) int64, any value outside [0, M) for none), −1 elsewhere.

Its backward is the gradient pass, itself an op: for incoming grads wr = ∂L/∂row, wc = ∂L/∂col,
G = wr_i·exp(Z_ij − row_i) + wc_j·exp(Z_ij − col_j) (softmax) or −t_ij·wr_i·σ(−t_ij·Z_ij) (sigmoid), and
da = s·G·b, db = s·Gᵀ·a, dscale = Σ G∘(a·bᵀ), dbias = Σ G. Every loss of the family is this op plus
O((N + M)·D) torch code (api.py), so autograd, torch.compile and a later distributed ring (which
merges row/col statistics across ranks) all work from the same two kernels per backend.

The statistics are fp64 (N + M numbers): an fp32 logsumexp of logits of size ~100 is off by up to
4e-6, which exp(Z − row) would turn into a relative error of every gradient entry.

Both are torch.library custom ops with fake (meta) implementations, so torch.compile(fullgraph=True)
keeps them as single nodes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast._backends import first_order_only, no_autocast
from mmfast.contrastive import chunked


def _cpu_stats(a, b, scale, bias, positives, sigmoid, with_cols):
    return torch.ops.mmfast.cpu_contrastive_stats(
        a, b, float(scale.detach()), _bias_value(bias), positives, sigmoid, with_cols
    )


def _cpu_grad(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid, need_a, need_b):
    return torch.ops.mmfast.cpu_contrastive_grad(
        a, b, float(scale.detach()), _bias_value(bias), positives, sigmoid, row, col, grad_row, grad_col,
        need_a, need_b,
    )


def _bias_value(bias: Optional[Tensor]) -> float:
    return float(bias.detach()) if bias is not None else 0.0


def _triton_stats(a, b, scale, bias, positives, sigmoid, with_cols):
    from mmfast.contrastive import triton_kernels  # imports triton: only once this backend runs

    return triton_kernels.triton_contrastive_stats(a, b, scale, bias, positives, sigmoid, with_cols)


def _triton_grad(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid, need_a, need_b):
    from mmfast.contrastive import triton_kernels

    return triton_kernels.triton_contrastive_grad(a, b, scale, bias, positives, row, col, grad_row, grad_col,
                                                  sigmoid, need_a, need_b)


def _cuda_stats(a, b, scale, bias, positives, sigmoid, with_cols):
    from mmfast.contrastive import cuda_kernels  # loads the CUDA library: only once this backend runs

    return cuda_kernels.cuda_contrastive_stats(a, b, scale, bias, positives, sigmoid, with_cols)


def _cuda_grad(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid, need_a, need_b):
    from mmfast.contrastive import cuda_kernels

    return cuda_kernels.cuda_contrastive_grad(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid,
                                              need_a, need_b)


# backend name → (stats, grad) with the signatures of chunked.stats / chunked.grad.
IMPLS = {
    "torch": (chunked.stats, chunked.grad),
    "cpu": (_cpu_stats, _cpu_grad),
    "triton": (_triton_stats, _triton_grad),
    "cuda": (_cuda_stats, _cuda_grad),
}


@torch.library.custom_op("mmfast::contrastive_stats", mutates_args=())
def contrastive_stats(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor], sigmoid: bool,
    with_cols: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    with no_autocast(a):
        return IMPLS[backend][0](a, b, scale, bias, positives, sigmoid, with_cols)


@contrastive_stats.register_fake
def _(a, b, scale, bias, positives, sigmoid, with_cols, backend):
    cols = b.shape[0] if with_cols and not sigmoid else 0
    return a.new_empty(a.shape[0], dtype=torch.float64), a.new_empty(cols, dtype=torch.float64)


@torch.library.custom_op("mmfast::contrastive_stats_backward", mutates_args=())
def contrastive_stats_backward(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor], row: Tensor,
    col: Tensor, grad_row: Tensor, grad_col: Tensor, sigmoid: bool, need_a: bool, need_b: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """→ (da (N, D) or (0,), db (M, D) or (0,), dscale [], dbias []); da/db in the input dtypes."""
    with no_autocast(a):
        return IMPLS[backend][1](a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid, need_a, need_b)


@contrastive_stats_backward.register_fake
def _(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid, need_a, need_b, backend):
    da = a.new_empty(a.shape) if need_a else a.new_empty(0)  # contiguous, as every backend returns
    db = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return da, db, a.new_empty((), dtype=torch.float32), a.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    a, b, scale, bias, positives, sigmoid, with_cols, backend = inputs
    ctx.save_for_backward(a, b, scale, bias, positives, *output)
    ctx.sigmoid, ctx.backend = sigmoid, backend


def _backward(ctx, grad_row, grad_col):
    a, b, scale, bias, positives, row, col = ctx.saved_tensors
    need_a, need_b, need_scale, need_bias = ctx.needs_input_grad[:4]
    if grad_row is None:
        grad_row = torch.zeros_like(row)
    if grad_col is None:
        grad_col = torch.zeros_like(col)
    da, db, dscale, dbias = contrastive_stats_backward(
        a, b, scale, bias, positives, row, col, grad_row, grad_col, ctx.sigmoid, need_a, need_b, ctx.backend
    )
    return (
        da if need_a else None,
        db if need_b else None,
        dscale.reshape(scale.shape).to(scale.dtype) if need_scale else None,
        dbias.reshape(bias.shape).to(bias.dtype) if need_bias else None,
        None, None, None, None,
    )


contrastive_stats.register_autograd(_backward, setup_context=_setup_context)
first_order_only(contrastive_stats_backward, "mmfast's contrastive losses")
