"""The `cuda` backend of the contrastive primitives: kernels/contrastive.cu, through mmfast._cuda (same
contract and returns as triton_kernels.py and csrc/contrastive_cpu.h).

stats (2·N·M·D FLOPs): a (P row programs × Q column splits) grid chosen as the triton backend's
  stats_grid (P = min(4·SMs, ⌈N/128⌉), Q splits of whole 128-wide tiles, so a small batch of queries
  against many keys still fills the GPU); each program writes its own partial slots, rows (Q, N) and
  columns (P, M) (max fp32 + Σ exp fp64: 12 bytes each), which the launcher's merge kernel folds in
  fp64 in a fixed order into row (N,) and col (M,). Deterministic.
grad: the row sweep, program (i, c) owning 64 rows of A and D-chunk c, walking every 128-wide column
  tile: Z recomputed, G formed in fp32 (ds, db: one fp64 partial per row block, summed here), dA's
  chunk accumulated on chip for the whole walk and written once, dB by fp32 atomics into an (M, D)
  fp32 buffer (cast here, as the triton backend does). 2·N·M·D per D-chunk + 4·N·M·D FLOPs; one chunk
  while 64 × D fp32 fits in shared memory (D ≤ 576 in bf16 on an H100/H200), two when it does not or
  when N is small against the GPU (see kernels/contrastive.cu).
  Under torch.use_deterministic_algorithms(True) no atomics: the row sweep leaves dB out and a column
  sweep (program per 64 rows of B, walking A, dB on chip) writes dB in the input dtype: 10·N·M·D FLOPs
  with the forward, as design.md budgets.
Precision: bf16/fp16 on tensor cores with fp32 accumulation, G in the input dtype for its two GEMMs;
fp32 on TF32 tensor cores only where torch would use TF32, else exact fp32; statistics, ds and db in
fp64. Counts are int64 in the kernels; only the feature width is an int32 there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _cuda
from mmfast._backends import fp32_matmul_allows_tf32
from mmfast._cuda import I32, I64, PTR
from mmfast.contrastive import chunked

_STATS_ROWS = _STATS_COLS = 128  # kernels/contrastive.cu's kStatsRows, kStatsCols
_GRAD_ROWS = 64  # kernels/contrastive.cu's kOwn: one ds/db partial per 64 rows of A
_WIDTH_LIMIT = 2**31 - 2**16  # D counts K slabs in an int

# (dtype, a, b, scale, bias, positives, n, m, d, row programs, splits, split width, sigmoid, with_cols,
#  tf32, row_max, row_sum, col_max, col_sum, row, col)
_stats = _cuda.function("mmfast_contrastive_stats", I32, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, I64,
                        I32, I32, I32, PTR, PTR, PTR, PTR, PTR, PTR)
# (dtype, a, b, scale, bias, positives, row, col, grad_row, grad_col, n, m, d, sigmoid, tf32, da, db, db32, sums)
_grad = _cuda.function("mmfast_contrastive_grad", I32, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64,
                       I32, I32, PTR, PTR, PTR, PTR)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_width(op: str, d: int) -> None:
    if d >= _WIDTH_LIMIT:
        raise ValueError(f"{op} (cuda backend): feature width {d}; the kernels take fewer than {_WIDTH_LIMIT} "
                         f"(use backend='torch')")


def _check_dtypes(a: Tensor, b: Tensor) -> None:
    """The kernels read both feature matrices as one element type."""
    if b.dtype != a.dtype:
        raise TypeError(f"the cuda backend's contrastive kernels take a and b of one dtype, got {a.dtype} and {b.dtype}")


def _scalars(scale: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """scale and bias as fp32 device scalars (the kernels read them: no host sync)."""
    return scale.reshape(()).float(), (bias.reshape(()).float() if bias is not None else None)


def _positives(positives: Optional[Tensor], sigmoid: bool) -> Optional[Tensor]:
    """The sigmoid loss's positives as the kernels read them: (N,) int64 contiguous (the triton backend
    loads any integer dtype; the kernels read int64), or None."""
    if not sigmoid or positives is None:
        return None
    return positives.to(torch.int64).contiguous()


def _tf32(a: Tensor) -> int:
    """1: fp32 tiles on TF32 tensor cores (where torch would use TF32 too); bf16/fp16 ignore it."""
    return int(a.dtype == torch.float32 and fp32_matmul_allows_tf32())


def stats_grid(n: int, m: int, device: torch.device) -> tuple[int, int, int]:
    """(row programs P, column splits Q, split width) of the stats kernel (chunked.stats_grid): about 4
    programs per SM."""
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return chunked.stats_grid(n, m, programs, _STATS_ROWS, _STATS_COLS)


def cuda_contrastive_stats(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                           sigmoid: bool, with_cols: bool) -> tuple[Tensor, Tensor]:
    """a: (N, D), b: (M, D) → row (N,), col (M,) or (0,), fp64 (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    _check_width("contrastive stats", d)
    _check_dtypes(a, b)
    with_cols = with_cols and not sigmoid
    s, bias_arg = _scalars(scale, bias)
    pos = _positives(positives, sigmoid)
    rows, splits, width = stats_grid(n, m, a.device)
    row_max = None if sigmoid else a.new_empty((splits, n), dtype=torch.float32)
    row_sum = a.new_empty((splits, n), dtype=torch.float64)
    col_max = a.new_empty((rows, m), dtype=torch.float32) if with_cols else None
    col_sum = a.new_empty((rows, m), dtype=torch.float64) if with_cols else None
    row = a.new_empty(n, dtype=torch.float64)
    col = a.new_empty(m if with_cols else 0, dtype=torch.float64)
    _stats(a, _cuda.dtype_code(a), a, b, s, bias_arg, pos, n, m, d, rows, splits, width, int(sigmoid),
           int(with_cols), _tf32(a), row_max, row_sum, col_max, col_sum, row, col)
    return row, col


def cuda_contrastive_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                          row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor, sigmoid: bool, need_a: bool,
                          need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """→ (da (N, D) or (0,), db (M, D) or (0,), dscale [], dbias []) (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    _check_width("contrastive grad", d)
    _check_dtypes(a, b)
    with_cols = not sigmoid and col.numel() > 0
    s, bias_arg = _scalars(scale, bias)
    pos = _positives(positives, sigmoid)
    columns_sweep = need_b and torch.are_deterministic_algorithms_enabled()
    da = a.new_empty((n, d)) if need_a else None
    db = b.new_empty((m, d)) if columns_sweep else None
    db32 = torch.zeros((m, d), dtype=torch.float32, device=a.device) if need_b and not columns_sweep else None
    sums = a.new_empty((_cdiv(n, _GRAD_ROWS), 2), dtype=torch.float64)
    _grad(a, _cuda.dtype_code(a), a, b, s, bias_arg, pos, row.double().contiguous(),
          col.double().contiguous() if with_cols else None, grad_row.float().contiguous(),
          grad_col.float().contiguous() if with_cols else None, n, m, d, int(sigmoid), _tf32(a), da, db, db32, sums)
    if db32 is not None:
        db = db32.to(b.dtype)
    total = sums.sum(0)
    return (da if need_a else a.new_empty(0), db if need_b else b.new_empty(0), total[0].float(),
            total[1].float())
