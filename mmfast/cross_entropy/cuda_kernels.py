"""The `cuda` backend of the masked-LM softmax: kernels/cross_entropy.cu through mmfast._cuda (same
contracts and signatures as triton_kernels.py; op.py's custom ops call these and hold the fakes).

cross_entropy: one warp (V ≤ 2048) or one block per row; the gradient kernel recomputes the row's
  statistics and writes g, over the logits themselves when `out` is x.
linear_cross_entropy: the kept rows are compacted on the device (a stable sort puts them first, their
  count stays a device tensor the kernels read: no host sync). The forward's work items are (vocabulary
  split × block of 64 kept rows), about _ITEMS_PER_SM per SM whatever the kept count, with per-split
  partials (a few MB at most) merged in fp64 by a finish kernel. The backward recomputes each 64 × 64
  logit tile and adds G·W, Gᵀ·H and G's column sums into fp32 dh, dW, dbias: by fp32 reductions from a
  persistent grid over (row block × vocabulary block) tiles, or, under
  torch.use_deterministic_algorithms(True), by two sweeps whose programs own their outputs (rows for dh,
  vocabulary blocks for dW and dbias), bit-for-bit repeatable.
Precision: fp16/bf16 tiles on tensor cores (G in the input dtype for the gradient products), fp32 tiles on
TF32 tensor cores only where torch allows TF32 matmuls, else exact fp32; statistics in fp64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast._backends import fp32_matmul_allows_tf32
from mmfast._cuda import F32, I32, I64, PTR, dtype_code, function
from mmfast.cross_entropy import chunked

_ce_forward = function("mmfast_cross_entropy_forward", PTR, PTR, PTR, PTR, I64, I64, I32, F32, F32)
_ce_grad = function("mmfast_cross_entropy_grad", PTR, PTR, PTR, PTR, I64, I64, I32, F32, F32)
_lce_forward = function("mmfast_linear_cross_entropy_forward",
                        PTR, PTR, PTR, PTR, PTR, PTR,  # h, w, bias, y, order, kept
                        PTR, PTR, PTR, PTR,  # the splits' partials: max, sum of exp, x_y, Σx
                        PTR, PTR,  # loss, lse
                        I64, I64, I64, I64, I32, I32, F32, F32)  # T, V, Dh, target items, dtype, tf32, ε, z
_lce_backward = function("mmfast_linear_cross_entropy_backward",
                         PTR, PTR, PTR, PTR, PTR, PTR,  # h, w, bias, y, order, kept
                         PTR, PTR, PTR, PTR, PTR,  # lse, row_weight, dh, dw, dbias
                         I64, I64, I64, I32, I32, I32, F32, F32)  # T, V, Dh, dtype, tf32, deterministic, ε, z

# kernels/cross_entropy.cu's kM: kept rows per tile.
_BLOCK_ROWS = 64
# Forward work items per SM (2 resident programs of 8 warps each, twice over): enough to fill the GPU at
# any kept count, and it bounds the partials to _BLOCK_ROWS · 2 · items entries.
_ITEMS_PER_SM = 4


# The row kernels launch a block (or a warp) per row: gridDim.x < 2^31 (the launchers return an invalid-argument
# error past it; this says so as the triton backend's check_sizes does).
_ROW_LIMIT = 2**31 - 1


def _check_rows(t: int) -> None:
    if t > _ROW_LIMIT:
        raise ValueError(f"cross_entropy (cuda backend): T = {t}; the kernels take at most {_ROW_LIMIT} rows "
                         f"(use backend='torch')")


def cross_entropy(x: Tensor, y: Tensor, eps: float, z: float) -> tuple[Tensor, Tensor]:
    """x: (T, V), y: (T,) → loss (T,) fp32, lse (T,) fp64 (NaN where chunked.py gives NaN: a NaN or +inf logit,
    a row of −inf logits; 0 and 0 on an ignored row)."""
    _check_rows(x.shape[0])
    x = x.contiguous()
    loss = x.new_empty(x.shape[0], dtype=torch.float32)
    lse = x.new_empty(x.shape[0], dtype=torch.float64)
    if x.shape[0]:
        _ce_forward(x, x, y.contiguous(), loss, lse, x.shape[0], x.shape[1], dtype_code(x), eps, z)
    return loss, lse


def cross_entropy_grad(x: Tensor, y: Tensor, row_weight: Tensor, eps: float, z: float, out: Tensor) -> None:
    """Writes the gradient of Σ_t row_weight_t·loss_t over x (T, V) into out (contiguous; may be x)."""
    _check_rows(x.shape[0])
    if x.shape[0]:
        _ce_grad(x, x.contiguous(), y.contiguous(), row_weight.float().contiguous(), out, x.shape[0], x.shape[1],
                 dtype_code(x), eps, z)


def _tf32(h: Tensor) -> int:
    return int(h.dtype == torch.float32 and fp32_matmul_allows_tf32())


def linear_cross_entropy(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, z: float):
    """h: (T, Dh), w: (V, Dh), bias: (V,) or None, y: (T,) → loss (T,) fp32, lse (T,) fp64."""
    h, w, y = h.contiguous(), w.contiguous(), y.contiguous()
    bias = bias.contiguous() if bias is not None else None
    t, v, d = h.shape[0], w.shape[0], h.shape[1]
    loss = h.new_empty(t, dtype=torch.float32)
    lse = h.new_empty(t, dtype=torch.float64)
    if t:
        order, n_kept = chunked.compact_rows(y)
        target = _ITEMS_PER_SM * torch.cuda.get_device_properties(h.device).multi_processor_count
        slots = _BLOCK_ROWS * max(-(-t // _BLOCK_ROWS), 2 * target)  # the kernels' bound on split × kept row
        mx = h.new_empty(slots, dtype=torch.float32)
        sums = h.new_empty(slots, dtype=torch.float64)
        xy = h.new_empty(slots, dtype=torch.float32)
        xsum = h.new_empty(slots, dtype=torch.float64)
        _lce_forward(h, h, w, bias, y, order, n_kept, mx, sums, xy, xsum, loss, lse, t, v, d, target, dtype_code(h),
                     _tf32(h), eps, z)
    return loss, lse


def linear_cross_entropy_grad(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, lse: Tensor,
                              row_weight: Tensor, eps: float, z: float):
    """→ dh (T, Dh), dw (V, Dh), dbias (V,) or (0,): gradients of Σ_t row_weight_t·loss_t."""
    h, w, y = h.contiguous(), w.contiguous(), y.contiguous()
    bias = bias.contiguous() if bias is not None else None
    t, v, d = h.shape[0], w.shape[0], h.shape[1]
    dh = torch.zeros((t, d), dtype=torch.float32, device=h.device)
    dw = torch.zeros((v, d), dtype=torch.float32, device=h.device)
    db = torch.zeros(v, dtype=torch.float32, device=h.device) if bias is not None else None
    if t:
        order, n_kept = chunked.compact_rows(y)
        _lce_backward(h, h, w, bias, y, order, n_kept, lse.double().contiguous(), row_weight.float().contiguous(),
                      dh, dw, db, t, v, d, dtype_code(h), _tf32(h), int(torch.are_deterministic_algorithms_enabled()),
                      eps, z)
    dh = dh.to(h.dtype)  # before dW's conversion, so that the fp32 dH is freed first
    return dh, dw.to(w.dtype), db.to(bias.dtype) if bias is not None else h.new_empty(0)
