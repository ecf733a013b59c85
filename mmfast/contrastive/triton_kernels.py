"""The `triton` backend of the contrastive primitives (same contract as csrc/contrastive_cpu.h).

Z = s·A·Bᵀ + b, A: (N, D), B: (M, D), is formed tile by tile in registers and never stored.

stats (one sweep, 2·N·M·D FLOPs): a (P row programs × Q column splits) grid. Program (p, q) takes
  row blocks p, p + P, ... (persistently) against the columns of split q, merging the rows' (max,
  sum of exp) online; the columns' (max, sum) come from the same tiles. Partials: rows (Q, N),
  columns (P, M), each slot written by exactly one program, merged afterwards (merge_lse: fp64, no
  (P, M) temporary). P = min(4·SMs, row blocks) and Q = ⌈4·SMs / P⌉ (fewer if M is narrow), so a
  small batch of queries against many keys still fills the GPU (N = 4096 on an H200: 32 × 17
  programs), and the column partials stay at most 4·SMs rows: 12·P·M bytes (528 rows on an H200:
  6.3 KB per column), the row partials 12·Q·N bytes (Q > 1 only while P·128 ≥ N: at most 1.6 MB).
grad (6·N·M·D FLOPs): the row sweep, program i owning row block i, recomputes each tile of Z, forms
  G in fp32, adds s·G·B_tile into its own rows of dA (plain read-modify-write: no other program
  writes them) and s·Gᵀ·A_rows into dB with fp32 atomics; each program starts its walk over the
  column tiles at a different tile, so concurrent atomics mostly hit different rows of dB.
  ds = Σ G∘(A·Bᵀ) and db = Σ G: one fp64 partial per program, summed in a fixed order.
Determinism: stats is deterministic (every partial slot has one writer and a fixed tile order; the
  merges run in a fixed order). The atomics make dB's bits depend on timing, so under
  torch.use_deterministic_algorithms(True) the row sweep leaves dB out and a column sweep (program
  j owning column block j, walking every row block) writes dB's rows itself: Z is recomputed once
  more, 8·N·M·D FLOPs backward, 10·N·M·D with the forward (design.md's budget).

Precision: bf16/fp16 tiles go to tensor cores with fp32 accumulation, G is cast to the input dtype
for its two GEMMs (as PyTorch's own bf16 backward does); fp32 inputs use TF32 only where torch
would (mmfast._triton.precision). Tile bases are int64 (N·D and N·M may pass 2^31), offsets inside
a tile int32 (sizes checked by check_sizes). Sums over many tiles (row sums, column partials, ds,
db) are carried in fp64, as in the CPU kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from mmfast._triton import INTERPRET, check_sizes, downcast, max_programs, merge_lse, mm, on_device, precision, wide
from mmfast.contrastive import chunked

if INTERPRET:
    # The CPU interpreter: small tiles, so tests at small sizes still cross tile edges.
    _STATS_BLOCK_M = 32
    _STATS_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32})]
else:
    # Hopper-sized tiles (128 wide, 3-4 stages, 8 warps) and smaller 4-warp ones for older GPUs.
    # Chosen so that ptxas (sm_90a, Triton 3.9) reports no register spills for bf16 inputs; wider
    # K/D steps (64) spilled 100s of bytes, and with the column splits' bookkeeping the 64-wide stats
    # tiles spilled at K steps of 64 (8 warps) and 32 (4 warps). Speed on a GPU is still to be measured.
    # BLOCK_M is the same in every stats config: it fixes the grid, hence which rows of the column
    # partials a run writes, and every config the autotuner tries must overwrite the same rows.
    _STATS_BLOCK_M = 128
    _STATS_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    ]
# A column split is whole tiles of every stats config (their BLOCK_N are powers of two).
_SPLIT_ALIGN = max(config.kwargs["BLOCK_N"] for config in _STATS_CONFIGS)
# The grad configs' smallest row block sets the most row-sweep programs (one ds/db partial each).
_GRAD_MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in _GRAD_CONFIGS)


@triton.jit
def _unscaled_logits(a_ptr, b_ptr, row0, col0, N, M, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tile of A·Bᵀ from rows row0… and columns col0…, fp32; past N, M and D reads 0."""
    a_rows = a_ptr + wide(row0) * D
    b_rows = b_ptr + wide(col0) * D
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + r[:, None] * D + k[None, :], mask=(r[:, None] < N - row0) & (k[None, :] < D), other=0.0)
        b = tl.load(b_rows + c[None, :] * D + k[:, None], mask=(c[None, :] < M - col0) & (k[:, None] < D), other=0.0)
        acc += mm(a, b, PRECISION)
    return acc


@triton.jit
def _softplus(z):
    """log(1 + e^z) = max(z, 0) + log1p(e^-|z|), log1p(x) as log(u)·x/(u − 1), u = 1 + x, which
    keeps full precision for small x (tl has no log1p that also runs in the interpreter)."""
    x = tl.exp(-tl.abs(z))
    u = 1.0 + x
    return tl.maximum(z, 0.0) + tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _pad(count, BLOCK: tl.constexpr):
    """(BLOCK,): 0 for the first `count` entries, -inf after. Added to Z, it makes exp and sigmoid
    of the padding exactly 0 (cheaper in registers than a 2-D mask)."""
    return tl.where(tl.arange(0, BLOCK) < count, 0.0, float("-inf"))


@triton.jit
def _positives(pos_ptr, row0, N, M, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's positive column (an index into B), -2 for none or padding (never a column index)."""
    if HAS_POS:
        r = tl.arange(0, BLOCK_M)
        pos = tl.load(pos_ptr + row0 + r, mask=r < N - row0, other=-2)
        return tl.where((pos >= 0) & (pos < M), pos, -2)
    return tl.full((BLOCK_M,), -2, tl.int64)


@triton.jit
def _hi_lo(stat):
    """An fp64 statistic as hi + lo fp32 parts, so that z − hi − lo keeps its precision."""
    hi = stat.to(tl.float32)
    return hi, (stat - hi.to(tl.float64)).to(tl.float32)


@triton.autotune(configs=_STATS_CONFIGS, key=["D"])
@triton.jit
def _stats_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                  N, M, D, SPLIT, SIGMOID: tl.constexpr, WITH_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_POS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Program (p, q): row blocks p, p + P, … against columns [q·SPLIT, (q + 1)·SPLIT) ∩ [0, M).
    Writes row partials at [q, rows] of (Q, N) (softmax: max fp32 and sum fp64; sigmoid: the sum of
    softplus only) and, WITH_COLS, column partials at [p, columns] of (P, M)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    split = tl.program_id(1)
    col_begin = split * SPLIT
    col_end = col_begin + tl.minimum(SPLIT, M - col_begin)
    s = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    for row_block in range(pid, tl.cdiv(N, BLOCK_M), programs):
        row0 = row_block * BLOCK_M
        row_pad = _pad(N - row0, BLOCK_M)
        pos = _positives(pos_ptr, row0, N, M, HAS_POS, BLOCK_M)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float64)
        for col0 in range(col_begin, col_end, BLOCK_N):
            z = s * _unscaled_logits(a_ptr, b_ptr, row0, col0, N, col_end, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) + b
            z = z + row_pad[:, None] + _pad(col_end - col0, BLOCK_N)[None, :]
            if SIGMOID:
                # softplus(-t·z) with t = +1 at the row's positive, -1 elsewhere; 0 at z = -inf.
                z = tl.where((col0 + c)[None, :] == pos[:, None], -z, z)
                row_sum += tl.sum(_softplus(z), axis=1).to(tl.float64)
            else:
                new_max = tl.maximum(row_max, tl.max(z, axis=1))
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows past N: keep exp finite
                rescale = tl.exp(row_max - ref).to(tl.float64)
                row_sum = row_sum * rescale + tl.sum(tl.exp(z - ref[:, None]), axis=1).to(tl.float64)
                row_max = new_max
                if WITH_COLS:
                    tile_max = tl.max(z, axis=0)
                    tile_ref = tl.where(tile_max == float("-inf"), 0.0, tile_max)
                    tile_sum = tl.sum(tl.exp(z - tile_ref[None, :]), axis=0).to(tl.float64)
                    slot = wide(pid) * M + col0 + c
                    in_range = c < col_end - col0
                    if row_block == pid:  # this program's first row block: its partial starts here
                        tl.store(col_max_ptr + slot, tile_max, mask=in_range)
                        tl.store(col_sum_ptr + slot, tile_sum, mask=in_range)
                    else:
                        old_max = tl.load(col_max_ptr + slot, mask=in_range, other=float("-inf"))
                        old_sum = tl.load(col_sum_ptr + slot, mask=in_range, other=0.0)
                        mx = tl.maximum(old_max, tile_max)
                        mref = tl.where(mx == float("-inf"), 0.0, mx)
                        old_scale = tl.exp(old_max - mref).to(tl.float64)
                        tile_scale = tl.exp(tile_max - mref).to(tl.float64)
                        tl.store(col_sum_ptr + slot, old_sum * old_scale + tile_sum * tile_scale, mask=in_range)
                        tl.store(col_max_ptr + slot, mx, mask=in_range)
        # int32: Q > 1 only where P is the number of row blocks (stats_grid), so Q·N < 2·programs·BLOCK_M
        row_slot = split * N + row0 + r
        if not SIGMOID:
            tl.store(row_max_ptr + row_slot, row_max, mask=r < N - row0)
        tl.store(row_sum_ptr + row_slot, row_sum, mask=r < N - row0)


@triton.jit
def _gradient(p, s, bias, row0, col0, N, M, pos_ptr, row_ptr, col_ptr, wr_ptr, wc_ptr, SIGMOID: tl.constexpr,
              WITH_COLS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """G = ∂L/∂Z, (BLOCK_M, BLOCK_N) fp32, of the tile at (row0, col0), from P = A·Bᵀ (0 in the
    padding); 0 in the padding, where Z is −inf. The rows' and columns' weights and statistics are
    loaded here, after the tile's GEMM, so that none is live across it (in the MMA layout a vector
    along a 64-wide tile's columns takes 16 registers per thread)."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    row_ok = r < N - row0
    wr = tl.load(wr_ptr + row0 + r, mask=row_ok, other=0.0)
    z = s * p + bias + _pad(N - row0, BLOCK_M)[:, None] + _pad(M - col0, BLOCK_N)[None, :]
    if SIGMOID:
        # d softplus(-t·z)/dz = -t·σ(-t·z): σ(z) for negatives, -σ(-z) for the positive.
        positive = (col0 + c)[None, :] == _positives(pos_ptr, row0, N, M, HAS_POS, BLOCK_M)[:, None]
        g = wr[:, None] * tl.where(positive, -tl.sigmoid(-z), tl.sigmoid(z))
    else:
        r_hi, r_lo = _hi_lo(tl.load(row_ptr + row0 + r, mask=row_ok, other=0.0))
        g = wr[:, None] * tl.exp(z - r_hi[:, None] - r_lo[:, None])
        if WITH_COLS:
            col_ok = c < M - col0
            c_hi, c_lo = _hi_lo(tl.load(col_ptr + col0 + c, mask=col_ok, other=0.0))
            wc = tl.load(wc_ptr + col0 + c, mask=col_ok, other=0.0)
            g += wc[None, :] * tl.exp(z - c_hi[None, :] - c_lo[None, :])
    return g


@triton.jit
def _accumulate(ptrs, update, mask, ATOMIC: tl.constexpr):
    """*ptrs += update: fp32 atomics where other programs add to the same entries, else a plain
    read-modify-write of entries this program alone writes (deterministic). Between one tile's
    store and the next tile's load of the same entries lies the next tile's GEMM, whose
    shared-memory staging synchronises the program's threads."""
    if ATOMIC:
        tl.atomic_add(ptrs, update, mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)


@triton.autotune(configs=_GRAD_CONFIGS, key=["D"], reset_to_zero=["da_ptr", "db_ptr", "sums_ptr"])
@triton.jit
def _grad_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, row_ptr, col_ptr, wr_ptr, wc_ptr, da_ptr, db_ptr,
                 sums_ptr, N, M, D, SIGMOID: tl.constexpr, WITH_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_POS: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, COLUMNS: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """COLUMNS=False, the row sweep: program i owns row block i and walks every column block; dA
    (NEED_A) by read-modify-write, dB (NEED_B) by fp32 atomics, its ds and db partials into
    sums[i, 0:2]. COLUMNS=True, the column sweep: program j owns column block j and walks every row
    block; dB (NEED_B; NEED_A must be False) by read-modify-write: no atomics anywhere."""
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    if COLUMNS:
        col0 = pid * BLOCK_N
        blocks = tl.cdiv(N, BLOCK_M)
    else:
        row0 = pid * BLOCK_M
        blocks = tl.cdiv(M, BLOCK_N)
        scale_grad = tl.zeros((BLOCK_M,), tl.float64)
        bias_grad = tl.zeros((BLOCK_M,), tl.float64)
    for step in range(0, blocks):
        block = (step + pid) % blocks  # a different start per program: concurrent atomics spread over dB
        if COLUMNS:
            row0 = block * BLOCK_M
        else:
            col0 = block * BLOCK_N
        p = _unscaled_logits(a_ptr, b_ptr, row0, col0, N, M, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        g = _gradient(p, s, bias, row0, col0, N, M, pos_ptr, row_ptr, col_ptr, wr_ptr, wc_ptr, SIGMOID, WITH_COLS,
                      HAS_POS, BLOCK_M, BLOCK_N)
        if not COLUMNS:
            scale_grad += tl.sum(g * p, axis=1).to(tl.float64)
            bias_grad += tl.sum(g, axis=1).to(tl.float64)
        g_in = downcast(g, a_ptr.dtype.element_ty)
        row_ok = r < N - row0
        col_ok = c < M - col0
        a_rows = a_ptr + wide(row0) * D
        b_rows = b_ptr + wide(col0) * D
        for d0 in range(0, D, BLOCK_D):
            k = d0 + tl.arange(0, BLOCK_D)
            k_ok = k < D
            if NEED_A:
                keys = tl.load(b_rows + c[:, None] * D + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                _accumulate(da_ptr + wide(row0) * D + r[:, None] * D + k[None, :], s * mm(g_in, keys, PRECISION),
                            row_ok[:, None] & k_ok[None, :], False)
            if NEED_B:
                queries = tl.load(a_rows + r[:, None] * D + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                _accumulate(db_ptr + wide(col0) * D + c[:, None] * D + k[None, :],
                            s * mm(tl.trans(g_in), queries, PRECISION), col_ok[:, None] & k_ok[None, :], not COLUMNS)
    if not COLUMNS:
        tl.store(sums_ptr + 2 * pid, tl.sum(scale_grad, axis=0))
        tl.store(sums_ptr + 2 * pid + 1, tl.sum(bias_grad, axis=0))


def _scalar_args(scale: Tensor, bias: Optional[Tensor]):
    scale = scale.reshape(()).float()
    return scale, (bias.reshape(()).float() if bias is not None else scale)


def stats_grid(n: int, m: int, device: torch.device) -> tuple[int, int, int]:
    """(row programs P, column splits Q, split width) of the stats kernel (chunked.stats_grid)."""
    return chunked.stats_grid(n, m, max_programs(device, interpreted=4), _STATS_BLOCK_M, _SPLIT_ALIGN)


@triton_op("mmfast::triton_contrastive_stats", mutates_args=())
def triton_contrastive_stats(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                             sigmoid: bool, with_cols: bool) -> tuple[Tensor, Tensor]:
    """a: (N, D), b: (M, D) → row (N,), col (M,) or (0,), fp64 (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    check_sizes("contrastive stats", d, N=n, M=m)
    with_cols = with_cols and not sigmoid
    s, bias_arg = _scalar_args(scale, bias)
    has_pos = sigmoid and positives is not None
    rows, splits, width = stats_grid(n, m, a.device)
    row_max = a.new_empty((1,) if sigmoid else (splits, n), dtype=torch.float32)
    row_sum = a.new_empty((splits, n), dtype=torch.float64)
    col_max = a.new_empty((rows, m) if with_cols else (1,), dtype=torch.float32)
    col_sum = a.new_empty((rows, m) if with_cols else (1,), dtype=torch.float64)
    with on_device(a):
        wrap_triton(_stats_kernel)[(rows, splits)](
            a, b, s, bias_arg, positives.contiguous() if has_pos else row_sum, row_max, row_sum, col_max, col_sum,
            n, m, d, width, SIGMOID=sigmoid, WITH_COLS=with_cols, HAS_BIAS=bias is not None, HAS_POS=has_pos,
            PRECISION=precision(a.dtype), BLOCK_M=_STATS_BLOCK_M,
        )
    empty = a.new_empty(0, dtype=torch.float64)
    if sigmoid:
        return row_sum.sum(0), empty
    return merge_lse(row_max, row_sum), merge_lse(col_max, col_sum) if with_cols else empty


@triton_op("mmfast::triton_contrastive_grad", mutates_args=())
def triton_contrastive_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                            row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor, sigmoid: bool, need_a: bool,
                            need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """→ (da (N, D) or (0,), db (M, D) or (0,), dscale [], dbias []) (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    check_sizes("contrastive grad", d, N=n, M=m)
    with_cols = not sigmoid and col.numel() > 0
    has_pos = sigmoid and positives is not None
    s, bias_arg = _scalar_args(scale, bias)
    da = torch.zeros((n, d) if need_a else (1,), dtype=torch.float32, device=a.device)
    db = torch.zeros((m, d) if need_b else (1,), dtype=torch.float32, device=a.device)
    sums = torch.zeros((triton.cdiv(n, _GRAD_MIN_BLOCK_M), 2), dtype=torch.float64, device=a.device)
    columns_sweep = need_b and torch.are_deterministic_algorithms_enabled()
    row64 = row.double().contiguous()
    inputs = (a, b, s, bias_arg, positives.contiguous() if has_pos else row64, row64,
              col.double().contiguous() if with_cols else row64, grad_row.float().contiguous(),
              grad_col.float().contiguous() if with_cols else row64)
    flags = dict(SIGMOID=sigmoid, WITH_COLS=with_cols, HAS_BIAS=bias is not None, HAS_POS=has_pos,
                 PRECISION=precision(a.dtype))

    def row_grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    def col_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_N"]),)

    with on_device(a):
        wrap_triton(_grad_kernel)[row_grid](*inputs, da, db, sums, n, m, d, NEED_A=need_a,
                                            NEED_B=need_b and not columns_sweep, COLUMNS=False, **flags)
        if columns_sweep:
            # Scratch in place of da and sums, which the autotuner would zero if it tuned this launch.
            wrap_triton(_grad_kernel)[col_grid](*inputs, torch.zeros_like(da[:1]), db, torch.zeros_like(sums[:1]),
                                                n, m, d, NEED_A=False, NEED_B=True, COLUMNS=True, **flags)
    da = da.to(a.dtype) if need_a else a.new_empty(0)
    db = db.to(b.dtype) if need_b else b.new_empty(0)
    total = sums.sum(0)
    return da, db, total[0].float(), total[1].float()
