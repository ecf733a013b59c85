"""The `torch` backend of the contrastive primitives: chunked PyTorch, any device.

Same contract as csrc/contrastive_cpu.h. Z = s·A·Bᵀ + b is formed CHUNK_ELEMS entries at a time (a
block of rows against every column), so memory is O((N + M)·D + CHUNK_ELEMS), never N×M.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# 2^20 logits (4 MB in fp32) per chunk: big enough that each chunk's GEMM runs at full speed,
# small enough that the handful of temporaries per chunk stay far below an N×M buffer.
CHUNK_ELEMS = 1 << 20


def _chunks(n: int, m: int):
    step = max(1, CHUNK_ELEMS // max(m, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def stats_grid(n: int, m: int, programs: int, block_m: int, align: int) -> tuple[int, int, int]:
    """(row programs P, column splits Q, split width) of a fused stats kernel (triton, cuda): P row
    programs of block_m rows (at most `programs`), and, when they do not fill the GPU, the columns
    split in Q widths of whole `align`-wide tiles, so that about `programs` programs run. An empty side
    gives an empty grid: the merges then give −inf (softmax) or 0 (sigmoid) per row and −inf per column."""
    rows = min(programs, -(-n // block_m))
    splits = max(1, min(-(-programs // max(rows, 1)), -(-m // align)))
    width = max(1, -(-(-(-m // splits)) // align)) * align
    return rows, -(-m // width), width


def _scalars(scale: Tensor, bias: Optional[Tensor]):
    return scale.float().reshape(()), (bias.float().reshape(()) if bias is not None else 0.0)


def _sigmoid_signs(z: Tensor, positives: Optional[Tensor], i0: int, i1: int) -> Tensor:
    """−t for the chunk's rows: +1 everywhere but −1 at each row's positive column (if in range)."""
    signs = torch.ones_like(z)
    if positives is not None:
        pos = positives[i0:i1]
        rows = torch.nonzero((pos >= 0) & (pos < z.shape[1]))[:, 0]
        signs[rows, pos[rows]] = -1.0
    return signs


def stats(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor], sigmoid: bool,
          with_cols: bool):
    """a: (N, D), b: (M, D) → row (N,) and col (M,) or (0,), fp64 (see contrastive_cpu.h)."""
    a32, b32 = a.float(), b.float()
    s, bb = _scalars(scale, bias)
    rows, col = [], None
    for i0, i1 in _chunks(a.shape[0], b.shape[0]):
        z = s * (a32[i0:i1] @ b32.T) + bb
        if sigmoid:
            rows.append(F.softplus(_sigmoid_signs(z, positives, i0, i1) * z).sum(1, dtype=torch.float64))
            continue
        rows.append(_logsumexp64(z, 1))
        if with_cols:
            part = _logsumexp64(z, 0)
            col = part if col is None else torch.logaddexp(col, part)
    if col is None:
        col = a32.new_empty(0, dtype=torch.float64)
    return torch.cat(rows), col


def _logsumexp64(z: Tensor, dim: int) -> Tensor:
    """logsumexp of fp32 z, returned in fp64 (the max is exact, the sum of exps fp32)."""
    if z.shape[dim] == 0:  # no terms (an empty negative bank): log 0
        return z.new_full(z.sum(dim).shape, float("-inf"), dtype=torch.float64)
    top = z.amax(dim, keepdim=True)
    return top.squeeze(dim).double() + torch.exp(z - top).sum(dim).double().log()


def _hi_lo(x: Tensor):
    """fp64 x as two fp32 parts, x ≈ hi + lo: z − hi − lo keeps x's precision."""
    hi = x.float()
    return hi, (x - hi.double()).float()


def grad(a, b, scale, bias, positives, row, col, grad_row, grad_col, sigmoid: bool, need_a: bool, need_b: bool):
    """G = wr·exp(Z − r) + wc·exp(Z − c) (or −t·wr·σ(−t·Z)) chunk by chunk → (dA, dB, ds, db)."""
    a32, b32 = a.float(), b.float()
    s, bb = _scalars(scale, bias)
    with_cols = not sigmoid and col.numel() > 0
    row_hi, row_lo = _hi_lo(row)
    col_hi, col_lo = _hi_lo(col)
    da = a32.new_zeros(a32.shape) if need_a else a32.new_empty(0)  # contiguous whatever a's strides
    db = b32.new_zeros(b32.shape) if need_b else b32.new_empty(0)
    ds = torch.zeros((), dtype=torch.float64, device=a.device)
    dbias = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0, i1 in _chunks(a.shape[0], b.shape[0]):
        p = a32[i0:i1] @ b32.T
        z = s * p + bb
        wr = grad_row[i0:i1, None].float()
        if sigmoid:
            signs = _sigmoid_signs(z, positives, i0, i1)
            g = signs * wr * torch.sigmoid(signs * z)
        else:
            g = wr * torch.exp(z - row_hi[i0:i1, None] - row_lo[i0:i1, None])
            if with_cols:
                g += grad_col[None].float() * torch.exp(z - col_hi[None] - col_lo[None])
        ds += (g * p).sum(dtype=torch.float64)
        dbias += g.sum(dtype=torch.float64)
        if need_a:
            torch.mm(g, b32, out=da[i0:i1])
        if need_b:
            db.addmm_(g.T, a32[i0:i1])
    return (s * da).to(a.dtype), (s * db).to(b.dtype), ds.float(), dbias.float()
