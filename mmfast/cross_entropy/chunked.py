"""The `torch` backend of the masked-LM softmax: chunked PyTorch, any device.

Same contract as csrc/cross_entropy_cpu.h. Logits given: a block of rows at a time (CHUNK_ELEMS
logits), so the only T×V buffer is the gradient itself. Linear variant: only the rows whose target
is kept, a block of them (against the whole vocabulary) at a time. Targets here are int64 with −1 for an
ignored row (op.py maps ignore_index). The kept rows are found with nonzero(), a host sync on a GPU;
the triton backend compacts on the device instead. The linear variant either forms the gradients
from the forward's own logits (fused, 6·T_kept·V·Dh FLOPs) or recomputes them in backward (8).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# 2^20 logits (4 MB in fp32) per block of given logits: the handful of temporaries per block stay
# far below a T×V buffer.
CHUNK_ELEMS = 1 << 20
# The linear variant's blocks: 2^22 logits (16 MB), at most 256 rows, at least 16. A block's dW
# update is a GEMM whose inner size is its row count and which reads and writes all of dW: with too
# few rows it runs at memory speed.
LINEAR_BLOCK_ELEMS = 1 << 22


def compact_rows(y: Tensor) -> tuple[Tensor, Tensor]:
    """The fused kernels' kept rows: their indices first, in order (a stable sort: no host sync),
    and their count as a (1,) int64 device tensor. y: (T,), −1 = ignored."""
    kept = y >= 0
    order = torch.sort((~kept).to(torch.uint8), stable=True).indices
    return order, kept.sum().reshape(1).to(torch.int64)


def _blocks(n: int, v: int, elems: int = CHUNK_ELEMS, min_rows: int = 1, max_rows: int = 1 << 62):
    step = min(max(min_rows, elems // max(v, 1)), max_rows)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _rows(x: Tensor, y: Tensor, eps: float, z: float, w: Optional[Tensor]):
    """One block: x (R, V) fp32, y (R,) ≥ 0 → loss (R,) fp32, lse (R,) fp64 and, with weights w (R,), the
    gradient of Σ w·loss (R, V) fp32. The sum of exps is fp64 and the target's gradient entry is
    formed in fp64 as expm1, as in the C++ kernel (a peaked row's gradient is that small entry)."""
    v = x.shape[1]
    top = x.amax(1, keepdim=True)
    lse = top.squeeze(1).double() + torch.exp(x - top).sum(1, dtype=torch.float64).log()
    x_y = x.gather(1, y[:, None]).squeeze(1).double()
    loss = lse - (1 - eps) * x_y + z * lse * lse
    if eps:
        loss = loss - eps * x.sum(1, dtype=torch.float64) / v
    if w is None:
        return loss.float(), lse, None
    w = w.double()
    a = w * (1 + 2 * z * lse)
    hi = lse.float()
    lo = (lse - hi.double()).float()
    g = torch.exp(x - hi[:, None] - lo[:, None]) * a.float()[:, None] - (w * eps / v).float()[:, None]
    g_y = a * torch.expm1(x_y - lse) + w * (2 * z * lse + eps * (1 - 1 / v))
    g.scatter_(1, y[:, None], g_y.float()[:, None])
    return loss.float(), lse, g


def cross_entropy(x: Tensor, y: Tensor, eps: float, z: float):
    """x: (T, V), y: (T,) → loss (T,) fp32, lse (T,) fp64 (0 for ignored rows)."""
    loss = x.new_zeros(x.shape[0], dtype=torch.float32)
    lse = x.new_zeros(x.shape[0], dtype=torch.float64)
    for r0, r1 in _blocks(*x.shape):
        yb = y[r0:r1]
        kept = yb >= 0
        l, s, _ = _rows(x[r0:r1].float(), yb.clamp_min(0), eps, z, None)
        loss[r0:r1] = torch.where(kept, l, 0.0)
        lse[r0:r1] = torch.where(kept, s, 0.0)
    return loss, lse


def cross_entropy_grad(x: Tensor, y: Tensor, row_weight: Tensor, eps: float, z: float, out: Tensor) -> None:
    """Writes the gradient of Σ_t row_weight_t·loss_t over x (T, V) into out (which may be x)."""
    for r0, r1 in _blocks(*x.shape):
        yb = y[r0:r1]
        w = torch.where(yb >= 0, row_weight[r0:r1].float(), 0.0)
        _, _, g = _rows(x[r0:r1].float(), yb.clamp_min(0), eps, z, w)
        out[r0:r1] = g


def _kept_blocks(h: Tensor, w32: Tensor, b32: Optional[Tensor], y: Tensor):
    """(rows, their logits x = h_rows·w32ᵀ + b32 in fp32, their hidden rows) for the kept rows,
    block by block (w32, b32: the weight and bias already in fp32)."""
    kept = torch.nonzero(y >= 0).squeeze(1)
    for r0, r1 in _blocks(kept.shape[0], w32.shape[0], LINEAR_BLOCK_ELEMS, 16, 256):
        rows = kept[r0:r1]
        hb = h.index_select(0, rows).float()
        x = hb @ w32.T
        yield rows, (x + b32 if b32 is not None else x), hb


def linear_cross_entropy(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, z: float):
    """h: (T, Dh), w: (V, Dh), bias: (V,) or None, y: (T,) → loss (T,) fp32, lse (T,) fp64."""
    loss = h.new_zeros(h.shape[0], dtype=torch.float32)
    lse = h.new_zeros(h.shape[0], dtype=torch.float64)
    b32 = bias.float() if bias is not None else None
    for rows, x, _ in _kept_blocks(h, w.float(), b32, y):
        loss[rows], lse[rows], _ = _rows(x, y[rows], eps, z, None)
    return loss, lse


def linear_cross_entropy_grad(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, lse: Tensor, row_weight: Tensor,
                              eps: float, z: float):
    """→ dh (T, Dh), dw (V, Dh) (accumulated in fp32), dbias (V,) (empty without bias): the gradients
    of Σ_t row_weight_t·loss_t. The logits are recomputed block by block (lse with them)."""
    return linear_cross_entropy_fused(h, w, bias, y, row_weight, eps, z)[2:]


def linear_cross_entropy_fused(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, row_weight: Tensor, eps: float,
                               z: float):
    """The loss and the gradients of Σ_t row_weight_t·loss_t from the same logits, block by block
    (6·T_kept·V·Dh FLOPs) → loss (T,) fp32, lse (T,) fp64, dh, dw (accumulated in fp32), dbias."""
    w32 = w.float()
    loss = h.new_zeros(h.shape[0], dtype=torch.float32)
    lse = h.new_zeros(h.shape[0], dtype=torch.float64)
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    dw = torch.zeros_like(w32, memory_format=torch.contiguous_format)
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=h.device) if bias is not None else None
    for rows, x, hb in _kept_blocks(h, w32, bias.float() if bias is not None else None, y):
        loss[rows], lse[rows], g = _rows(x, y[rows], eps, z, row_weight[rows])
        dh[rows] = g @ w32
        dw.addmm_(g.T, hb)
        if db is not None:
            db += g.sum(0)
    return (loss, lse, dh.to(h.dtype), dw.to(w.dtype),
            db.to(bias.dtype) if db is not None else h.new_empty(0))
