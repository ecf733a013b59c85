"""The `triton` backend of the masked-LM softmax (same contracts as chunked.py / op.py).

cross_entropy (logits given): one program per row walks the row in BLOCK_V chunks twice at most:
  the forward merges (max, sum of exp) online; the gradient kernel recomputes them and writes
  g = w·(softmax·(1 + 2z·lse) − ε/V) chunk by chunk (over the logits themselves when in place),
  the target's entry selected inside its chunk's store.
linear_cross_entropy: the kept rows are compacted on the device (a stable sort puts them first;
  their count stays a device tensor, read by the kernels), so there is no host sync and the grid is
  sized for all T rows: programs past the kept count return at once.
  forward (2·T_kept·V·Dh FLOPs): program (row block, vocabulary split) forms its tiles of
    X = H·Wᵀ + bias and merges (max, sum of exp), the target's logit and Σ_v X_tv online; the
    splits' partials ((splits, T) each) are merged in fp64 afterwards (merge_lse, in split order).
  backward (6·T_kept·V·Dh FLOPs): program (row block, vocabulary tile) recomputes its tile of X,
    forms G in fp32 and adds G·W_tile into dH and Gᵀ·H_rows into dW (and G's column sums into
    dbias) with fp32 atomics.
Determinism: every kernel but the linear backward writes each output from one program in a fixed
order, so results repeat bit for bit; the linear backward's atomics do not, and under
torch.use_deterministic_algorithms(True) it raises (warn_only: warns), as torch's own ops do.
The target's gradient entry, softmax − 1 in a peaked row, is formed as expm1 of the fp64 lse's
difference (hi + lo fp32 parts), so it keeps its precision when softmax_y → 1. Sums over V are fp64.
Targets are int64 with −1 for an ignored row. These are plain functions: op.py's custom ops call
them (and hold the fakes), so torch.compile sees one opaque node per op.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast._triton import (INTERPRET, alert_nondeterministic, check_sizes, downcast, merge_lse, mm, on_device,
                            precision, wide)
from mmfast.cross_entropy import chunked

if INTERPRET:
    # The CPU interpreter: small tiles, so tests at small sizes still cross tile edges.
    _ROW_BLOCK_V = 32
    _LCE_FWD_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    _LCE_SPLIT_V = 64
    _LCE_BWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
else:
    # A row chunk of 4096 logits: 16 per thread at 8 warps, enough loads in flight per SM.
    _ROW_BLOCK_V = 4096
    # Forward: 64 kept rows × 128-wide vocabulary tiles, K steps of 64, a split of 4096 columns
    # per program (so a batch of few kept rows still spreads over the SMs). Backward: 64 × 128
    # tiles. Not yet measured on a GPU; chosen as the contrastive kernels' spill-free shapes.
    _LCE_FWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    _LCE_SPLIT_V = 4096
    _LCE_BWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]


@triton.jit
def _expm1(d):
    """e^d − 1 accurate for small d: (u − 1)·d / log(u) with u = e^d (tl has no expm1 that also
    runs in the interpreter)."""
    u = tl.exp(d)
    log_u = tl.log(u)
    safe = tl.where(log_u == 0.0, 1.0, log_u)  # u = 1: the result is d (no 0/0 even where unused)
    return tl.where(log_u == 0.0, d, tl.where(tl.abs(d) < 0.5, (u - 1.0) * d / safe, u - 1.0))


@triton.jit
def _target_grad(x_y, hi, lo, w, lse, eps, z, V):
    """The target's entry of g: a·(softmax_y − 1) + w·(2z·lse + ε·(1 − 1/V)), a = w·(1 + 2z·lse)."""
    a = w * (1.0 + 2.0 * z * lse)
    return a * _expm1((x_y - hi) - lo) + w * (2.0 * z * lse + eps * (1.0 - 1.0 / V))


@triton.jit
def _sum_exp(x, ref, axis: tl.constexpr):
    """Σ exp(x − ref) along axis in fp64, ref ≥ x. Entries equal to ref add exactly 1 each and are
    counted apart: summed in fp32 with the rest, that 1 would swamp the small terms of a peaked
    row, whose whole loss, lse − x_y = log(1 + Σ_{v≠y} e^(x_v − x_y)), is made of them."""
    top = tl.where(x == ref, 1.0, 0.0)
    return tl.sum(tl.exp(x - ref) - top, axis=axis).to(tl.float64) + tl.sum(top, axis=axis).to(tl.float64)


@triton.jit
def _row_stats(x_row, V, BLOCK_V: tl.constexpr):
    """(max, fp64 sum of exp against it, fp64 Σ x) of one row, in one pass over its chunks."""
    cols = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float64)
    sum_x = tl.zeros([], tl.float64)
    for v0 in range(0, V, BLOCK_V):
        in_row = cols < V - v0
        x = tl.load(x_row + v0 + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_mx = tl.maximum(mx, tl.max(x, axis=0))
        ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        total = total * tl.exp(mx - ref).to(tl.float64) + _sum_exp(x, ref, 0)
        sum_x += tl.sum(tl.where(in_row, x, 0.0), axis=0).to(tl.float64)
        mx = new_mx
    return mx, total, sum_x


@triton.jit
def _ce_fwd_kernel(x_ptr, y_ptr, loss_ptr, lse_ptr, V, eps, z, BLOCK_V: tl.constexpr):
    t = tl.program_id(0)
    x_row = x_ptr + wide(t) * V
    y = tl.load(y_ptr + t)
    if y < 0:
        tl.store(loss_ptr + t, 0.0)
        tl.store(lse_ptr + t, 0.0)
        return
    mx, total, sum_x = _row_stats(x_row, V, BLOCK_V)
    lse = mx.to(tl.float64) + tl.log(total)
    smoothing = tl.where(eps == 0.0, 0.0, eps * sum_x / V)  # without ε, −inf logits must not make 0·(−inf)
    loss = lse - (1.0 - eps) * tl.load(x_row + y).to(tl.float64) - smoothing + z * lse * lse
    tl.store(loss_ptr + t, loss.to(tl.float32))
    tl.store(lse_ptr + t, lse)


@triton.jit
def _ce_grad_kernel(x_ptr, y_ptr, w_ptr, out_ptr, V, eps, z, BLOCK_V: tl.constexpr):
    t = tl.program_id(0)
    x_row = x_ptr + wide(t) * V
    out_row = out_ptr + wide(t) * V
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + t)
    if y < 0:
        for v0 in range(0, V, BLOCK_V):
            tl.store(out_row + v0 + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < V - v0)
        return
    # x_y is read before anything is written (out may be x itself): before _row_stats, whose
    # cross-warp reductions synchronise the program's threads ahead of the first store.
    x_y = tl.load(x_row + y).to(tl.float32)
    w = tl.load(w_ptr + t).to(tl.float32)
    mx, total, _ = _row_stats(x_row, V, BLOCK_V)
    lse = mx.to(tl.float64) + tl.log(total)
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    a = w * (1.0 + 2.0 * z * hi)
    c = -w * eps / V
    g_y = _target_grad(x_y, hi, lo, w, hi, eps, z, V)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(x_row + v0 + cols, mask=cols < V - v0, other=0.0).to(tl.float32)
        # The target's entry goes out in its chunk's store: a separate store of it, unordered with
        # the chunk's (no barrier between them; another warp may own that column), could be overwritten.
        g = tl.where(v0 + cols == y, g_y, a * tl.exp((x - hi) - lo) + c)
        tl.store(out_row + v0 + cols, downcast(g, out_ptr.dtype.element_ty), mask=cols < V - v0)


_ROW_LAUNCH = dict(BLOCK_V=_ROW_BLOCK_V) if INTERPRET else dict(BLOCK_V=_ROW_BLOCK_V, num_warps=8)


def cross_entropy(x: Tensor, y: Tensor, eps: float, z: float) -> tuple[Tensor, Tensor]:
    """x: (T, V), y: (T,) → loss (T,) fp32, lse (T,) fp64."""
    x = x.contiguous()
    check_sizes("cross_entropy", T=x.shape[0], V=x.shape[1])
    loss = x.new_empty(x.shape[0], dtype=torch.float32)
    lse = x.new_empty(x.shape[0], dtype=torch.float64)
    if x.shape[0]:
        with on_device(x):
            _ce_fwd_kernel[(x.shape[0],)](x, y.contiguous(), loss, lse, x.shape[1], eps, z, **_ROW_LAUNCH)
    return loss, lse


def cross_entropy_grad(x: Tensor, y: Tensor, row_weight: Tensor, eps: float, z: float, out: Tensor) -> None:
    """Writes the gradient of Σ_t row_weight_t·loss_t over x (T, V) into out (contiguous; may be x)."""
    check_sizes("cross_entropy", T=x.shape[0], V=x.shape[1])
    if x.shape[0]:
        with on_device(x):
            _ce_grad_kernel[(x.shape[0],)](x.contiguous(), y.contiguous(), row_weight.float().contiguous(), out,
                                           x.shape[1], eps, z, **_ROW_LAUNCH)


@triton.jit
def _kept_rows(order_ptr, y_ptr, row0, n_kept, BLOCK_M: tl.constexpr):
    """The original indices, targets and validity of kept rows row0 … row0 + BLOCK_M of the compacted order."""
    r = tl.arange(0, BLOCK_M)
    row_ok = r < n_kept - row0
    rows = tl.load(order_ptr + row0 + r, mask=row_ok, other=0)
    return rows, tl.load(y_ptr + rows, mask=row_ok, other=-1), row_ok


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, v0, v_end, D, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of H[rows]·W[v0:v0 + BLOCK_N]ᵀ + bias; 0 past v_end and D."""
    c = v0 + tl.arange(0, BLOCK_N)
    col_ok = c < v_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + wide(v0) * D
    cl = tl.arange(0, BLOCK_N)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        hb = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        wb = tl.load(w_rows + cl[None, :] * D + k[:, None], mask=col_ok[None, :] & (k[:, None] < D), other=0.0)
        acc += mm(hb, wb, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lce_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, kept_ptr, mx_ptr, sum_ptr, xy_ptr, xsum_ptr, T, V, D,
                    SPLIT_V, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    n_kept = tl.load(kept_ptr)
    if row0 >= n_kept:
        return
    rows, y, row_ok = _kept_rows(order_ptr, y_ptr, row0, n_kept, BLOCK_M)
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float64)
    x_y = tl.zeros((BLOCK_M,), tl.float32)
    sum_x = tl.zeros((BLOCK_M,), tl.float64)
    v_begin = split * SPLIT_V
    v_end = tl.minimum(V, v_begin + SPLIT_V)
    for v0 in range(v_begin, v_end, BLOCK_N):
        x = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, v0, v_end, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        c = v0 + tl.arange(0, BLOCK_N)
        xm = tl.where((c < v_end)[None, :], x, float("-inf"))
        new_mx = tl.maximum(mx, tl.max(xm, axis=1))
        ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)  # a −inf tile (masked vocabulary) adds nothing
        total = total * tl.exp(mx - ref).to(tl.float64) + _sum_exp(xm, ref[:, None], 1)
        mx = new_mx
        x_y += tl.sum(tl.where(c[None, :] == y[:, None], x, 0.0), axis=1)
        sum_x += tl.sum(x, axis=1).to(tl.float64)  # x is 0 past v_end
    slot = wide(split) * T + rows
    tl.store(mx_ptr + slot, mx, mask=row_ok)
    tl.store(sum_ptr + slot, total, mask=row_ok)
    tl.store(xy_ptr + slot, x_y, mask=row_ok)
    tl.store(xsum_ptr + slot, sum_x, mask=row_ok)


@triton.autotune(configs=_LCE_BWD_CONFIGS, key=["D"], reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])
@triton.jit
def _lce_bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, kept_ptr, lse_ptr, rw_ptr, dh_ptr, dw_ptr, db_ptr, V, D,
                    eps, z, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    v0 = tl.program_id(1) * BLOCK_N
    n_kept = tl.load(kept_ptr)
    if row0 >= n_kept:
        return
    rows, y, row_ok = _kept_rows(order_ptr, y_ptr, row0, n_kept, BLOCK_M)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    wt = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
    x = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, v0, V, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    c = v0 + tl.arange(0, BLOCK_N)
    col_ok = c < V
    a = wt * (1.0 + 2.0 * z * hi)
    g = a[:, None] * tl.exp((x - hi[:, None]) - lo[:, None]) - (wt * eps / V)[:, None]
    is_y = c[None, :] == y[:, None]
    g_y = _target_grad(tl.sum(tl.where(is_y, x, 0.0), axis=1), hi, lo, wt, hi, eps, z, V)
    g = tl.where(is_y, g_y[:, None], g)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + c, tl.sum(g, axis=0), mask=col_ok)
    g_in = downcast(g, h_ptr.dtype.element_ty)
    cl = tl.arange(0, BLOCK_N)
    w_rows = w_ptr + wide(v0) * D
    dw_rows = dw_ptr + wide(v0) * D
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        wb = tl.load(w_rows + cl[:, None] * D + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        tl.atomic_add(dh_ptr + rows[:, None] * D + k[None, :], mm(g_in, wb, PRECISION), mask=row_ok[:, None] & k_ok[None, :])
        hb = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        tl.atomic_add(dw_rows + cl[:, None] * D + k[None, :], mm(tl.trans(g_in), hb, PRECISION),
                      mask=col_ok[:, None] & k_ok[None, :])


def linear_cross_entropy(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, z: float):
    """h: (T, Dh), w: (V, Dh), bias: (V,) or None, y: (T,) → loss (T,) fp32, lse (T,) fp64."""
    h, w, y = h.contiguous(), w.contiguous(), y.contiguous()
    bias = bias.contiguous() if bias is not None else None
    t, v, d = h.shape[0], w.shape[0], h.shape[1]
    check_sizes("linear_cross_entropy", d, T=t, V=v)
    order, n_kept = chunked.compact_rows(y)
    cfg = dict(_LCE_FWD_CONFIG)
    splits = triton.cdiv(v, _LCE_SPLIT_V)
    mx = h.new_full((splits, t), float("-inf"), dtype=torch.float32)
    sums = h.new_zeros((splits, t), dtype=torch.float64)
    xy = h.new_zeros((splits, t), dtype=torch.float32)
    xsum = h.new_zeros((splits, t), dtype=torch.float64)
    if t:
        with on_device(h):
            _lce_fwd_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), splits)](
                h, w, bias if bias is not None else h, y, order, n_kept, mx, sums, xy, xsum, t, v, d, _LCE_SPLIT_V,
                HAS_BIAS=bias is not None, PRECISION=precision(h.dtype), **cfg)
    lse = merge_lse(mx, sums)  # −inf for ignored rows, masked below
    loss = lse - (1 - eps) * xy.sum(0).double() + z * lse * lse  # one split holds x_y: the fp32 sum is exact
    if eps:
        loss = loss - eps * xsum.sum(0) / v
    kept = y >= 0
    return torch.where(kept, loss, 0.0).float(), torch.where(kept, lse, 0.0)


def linear_cross_entropy_grad(h: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, lse: Tensor,
                              row_weight: Tensor, eps: float, z: float):
    """→ dh (T, Dh), dw (V, Dh), dbias (V,) or (0,): gradients of Σ_t row_weight_t·loss_t."""
    alert_nondeterministic("linear_cross_entropy's backward")
    h, w, y = h.contiguous(), w.contiguous(), y.contiguous()
    bias = bias.contiguous() if bias is not None else None
    t, v, d = h.shape[0], w.shape[0], h.shape[1]
    check_sizes("linear_cross_entropy", d, T=t, V=v)
    order, n_kept = chunked.compact_rows(y)
    dh = torch.zeros((t, d), dtype=torch.float32, device=h.device)
    dw = torch.zeros((v, d), dtype=torch.float32, device=h.device)
    db = torch.zeros(v if bias is not None else 1, dtype=torch.float32, device=h.device)

    def grid(meta):
        return (triton.cdiv(t, meta["BLOCK_M"]), triton.cdiv(v, meta["BLOCK_N"]))

    if t:
        with on_device(h):
            _lce_bwd_kernel[grid](h, w, bias if bias is not None else h, y, order, n_kept, lse.double().contiguous(),
                                  row_weight.float().contiguous(), dh, dw, db, v, d, eps, z,
                                  HAS_BIAS=bias is not None, PRECISION=precision(h.dtype))
    dh = dh.to(h.dtype)  # before dW's conversion, so that the fp32 dH is freed first
    return dh, dw.to(w.dtype), db.to(bias.dtype) if bias is not None else h.new_empty(0)
