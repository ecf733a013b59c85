"""The `triton` backend of the contrastive primitives (same contract as csrc/contrastive_cpu.h).

Z = s·A·Bᵀ + b, A: (N, D), B: (M, D), is formed tile by tile in registers and never stored.

stats (one sweep, 2·N·M·D FLOPs): a program owns row blocks (persistently: program p takes row
  blocks p, p + P, ...) and walks every column tile, merging the rows' (max, sum of exp) online.
  Column statistics come from the same tiles: each program keeps a running (max, sum) per column
  in a (P, M) buffer it alone writes, merged over programs afterwards. P ≤ 4 × the SM count, so the
  buffer is at most 8·P·M bytes (P = 528 on an H100/H200: 4.2 KB per column), whatever N is.
grad (one sweep, 6·N·M·D FLOPs): a program owns a row block, recomputes each tile of Z, forms G in
  fp32, adds s·G·B_tile into its own rows of dA (plain read-modify-write: no other program writes
  them) and s·Gᵀ·A_rows into dB with fp32 atomics; the column tiles are walked from a different
  start in each program, so the atomics of concurrent programs mostly hit different rows of dB.
  ds = Σ G∘(A·Bᵀ) and db = Σ G are reduced in the same pass (one atomic per program).

Precision: bf16/fp16 tiles go to tensor cores with fp32 accumulation, G is cast to the input dtype
for its two GEMMs (as PyTorch's own bf16 backward does); fp32 inputs use TF32 only where torch
would (torch.get_float32_matmulprecision() != "highest"). Tile bases are int64 (N·D and N·M may
pass 2^31), offsets inside a tile int32. Sums over many tiles (row sums, column partials, ds, db)
are carried in fp64, as in the CPU kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from mmfast._triton import INTERPRET, mm, on_device, precision, wide

if INTERPRET:
    # The CPU interpreter: small tiles, so tests at small sizes still cross tile edges.
    _STATS_BLOCK_M = 32
    _STATS_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32})]
else:
    # Hopper-sized tiles (128 wide, 3-4 stages, 8 warps) and smaller 4-warp ones for older GPUs.
    # Chosen so that ptxas (sm_90a, Triton 3.9) reports no register spills for bf16 inputs; wider
    # K/D steps (64) spilled 100s of bytes. Speed on a GPU is still to be measured and tuned.
    # BLOCK_M is the same in every stats config: it fixes the grid, hence which rows of the column
    # partials a run writes, and every config the autotuner tries must overwrite the same rows.
    _STATS_BLOCK_M = 128
    _STATS_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    ]


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


@triton.autotune(configs=_STATS_CONFIGS, key=["D"])
@triton.jit
def _stats_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                  N, M, D, SIGMOID: tl.constexpr, WITH_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
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
        for col0 in range(0, M, BLOCK_N):
            z = s * _unscaled_logits(a_ptr, b_ptr, row0, col0, N, M, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) + b
            z = z + row_pad[:, None] + _pad(M - col0, BLOCK_N)[None, :]
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
                    in_range = c < M - col0
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
        tl.store(row_max_ptr + row0 + r, row_max, mask=r < N - row0)
        tl.store(row_sum_ptr + row0 + r, row_sum, mask=r < N - row0)


@triton.autotune(configs=_GRAD_CONFIGS, key=["D"], reset_to_zero=["da_ptr", "db_ptr", "sums_ptr"])
@triton.jit
def _grad_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, row_ptr, col_ptr, wr_ptr, wc_ptr, da_ptr, db_ptr,
                 sums_ptr, N, M, D, SIGMOID: tl.constexpr, WITH_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_POS: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    row0 = pid * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    row_ok = r < N - row0
    row_pad = _pad(N - row0, BLOCK_M)
    wr = tl.load(wr_ptr + row0 + r, mask=row_ok, other=0.0)
    pos = _positives(pos_ptr, row0, N, M, HAS_POS, BLOCK_M)
    # The fp64 row statistic as hi + lo fp32 parts, so z - hi - lo keeps its precision (unused by sigmoid).
    row_stat = tl.load(row_ptr + row0 + r, mask=row_ok, other=0.0)
    r_hi = row_stat.to(tl.float32)
    r_lo = (row_stat - r_hi.to(tl.float64)).to(tl.float32)
    a_rows = a_ptr + wide(row0) * D
    da_rows = da_ptr + wide(row0) * D
    scale_grad = tl.zeros((BLOCK_M,), tl.float64)
    bias_grad = tl.zeros((BLOCK_M,), tl.float64)
    col_blocks = tl.cdiv(M, BLOCK_N)
    for step in range(0, col_blocks):
        col0 = (step + pid) % col_blocks * BLOCK_N
        col_ok = c < M - col0
        p = _unscaled_logits(a_ptr, b_ptr, row0, col0, N, M, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        z = s * p + b + row_pad[:, None] + _pad(M - col0, BLOCK_N)[None, :]  # p is 0 in the padding: so is G·p
        if SIGMOID:
            # d softplus(-t·z)/dz = -t·σ(-t·z): σ(z) for negatives, -σ(-z) for the positive.
            positive = (col0 + c)[None, :] == pos[:, None]
            g = wr[:, None] * tl.where(positive, -tl.sigmoid(-z), tl.sigmoid(z))
        else:
            g = wr[:, None] * tl.exp(z - r_hi[:, None] - r_lo[:, None])
            if WITH_COLS:
                col_stat = tl.load(col_ptr + col0 + c, mask=col_ok, other=0.0)
                c_hi = col_stat.to(tl.float32)
                c_lo = (col_stat - c_hi.to(tl.float64)).to(tl.float32)
                wc = tl.load(wc_ptr + col0 + c, mask=col_ok, other=0.0)
                g += wc[None, :] * tl.exp(z - c_hi[None, :] - c_lo[None, :])
        scale_grad += tl.sum(g * p, axis=1).to(tl.float64)
        bias_grad += tl.sum(g, axis=1).to(tl.float64)
        g_in = g.to(a_ptr.dtype.element_ty)
        b_rows = b_ptr + wide(col0) * D
        db_rows = db_ptr + wide(col0) * D
        for d0 in range(0, D, BLOCK_D):
            k = d0 + tl.arange(0, BLOCK_D)
            if NEED_A:
                keys = tl.load(b_rows + c[:, None] * D + k[None, :], mask=col_ok[:, None] & (k[None, :] < D), other=0.0)
                da_mask = row_ok[:, None] & (k[None, :] < D)
                da = tl.load(da_rows + r[:, None] * D + k[None, :], mask=da_mask, other=0.0)
                tl.store(da_rows + r[:, None] * D + k[None, :], da + s * mm(g_in, keys, PRECISION), mask=da_mask)
            if NEED_B:
                queries = tl.load(a_rows + r[:, None] * D + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
                update = s * mm(tl.trans(g_in), queries, PRECISION)
                tl.atomic_add(db_rows + c[:, None] * D + k[None, :], update, mask=col_ok[:, None] & (k[None, :] < D))
    tl.atomic_add(sums_ptr, tl.sum(scale_grad, axis=0))
    tl.atomic_add(sums_ptr + 1, tl.sum(bias_grad, axis=0))


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two programs already exercise the persistent loop and the merge


def _scalar_args(scale: Tensor, bias: Optional[Tensor]):
    scale = scale.reshape(()).float()
    return scale, (bias.reshape(()).float() if bias is not None else scale)


@triton_op("mmfast::triton_contrastive_stats", mutates_args=())
def triton_contrastive_stats(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                             sigmoid: bool, with_cols: bool) -> tuple[Tensor, Tensor]:
    """a: (N, D), b: (M, D) → row (N,), col (M,) or (0,), fp64 (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    with_cols = with_cols and not sigmoid
    s, bias_arg = _scalar_args(scale, bias)
    has_pos = sigmoid and positives is not None
    row_max = a.new_empty(n, dtype=torch.float32)
    row_sum = a.new_empty(n, dtype=torch.float64)
    programs = min(_max_programs(a.device), triton.cdiv(n, _STATS_BLOCK_M))
    # Column partials (max, sum), one row per program; each program writes all of its row.
    col_max = a.new_empty((programs if with_cols else 1, m), dtype=torch.float32)
    col_sum = a.new_empty((programs if with_cols else 1, m), dtype=torch.float64)
    with on_device(a):
        wrap_triton(_stats_kernel)[(programs,)](
            a, b, s, bias_arg, positives.contiguous() if has_pos else row_max, row_max, row_sum, col_max, col_sum,
            n, m, d, SIGMOID=sigmoid, WITH_COLS=with_cols, HAS_BIAS=bias is not None, HAS_POS=has_pos,
            PRECISION=precision(a.dtype), BLOCK_M=_STATS_BLOCK_M,
        )
    if sigmoid:
        return row_sum, a.new_empty(0, dtype=torch.float64)
    row = row_max.double() + row_sum.log()
    if not with_cols:
        return row, a.new_empty(0, dtype=torch.float64)
    top = col_max.max(0).values
    return row, top.double() + (col_sum * torch.exp(col_max - top).double()).sum(0).log()


@triton_op("mmfast::triton_contrastive_grad", mutates_args=())
def triton_contrastive_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], positives: Optional[Tensor],
                            row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor, sigmoid: bool, need_a: bool,
                            need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """→ (da (N, D) or (0,), db (M, D) or (0,), dscale [], dbias []) (see contrastive_cpu.h)."""
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    with_cols = not sigmoid and col.numel() > 0
    has_pos = sigmoid and positives is not None
    s, bias_arg = _scalar_args(scale, bias)
    da = torch.zeros((n, d) if need_a else (1,), dtype=torch.float32, device=a.device)
    db = torch.zeros((m, d) if need_b else (1,), dtype=torch.float32, device=a.device)
    sums = torch.zeros(2, dtype=torch.float64, device=a.device)
    row64 = row.double().contiguous()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    with on_device(a):
        wrap_triton(_grad_kernel)[grid](
            a, b, s, bias_arg, positives.contiguous() if has_pos else row64, row64,
            col.double().contiguous() if with_cols else row64, grad_row.float().contiguous(),
            grad_col.float().contiguous() if with_cols else row64, da, db, sums, n, m, d,
            SIGMOID=sigmoid, WITH_COLS=with_cols, HAS_BIAS=bias is not None, HAS_POS=has_pos,
            NEED_A=need_a, NEED_B=need_b, PRECISION=precision(a.dtype),
        )
    da = da.to(a.dtype) if need_a else a.new_empty(0)
    db = db.to(b.dtype) if need_b else b.new_empty(0)
    return da, db, sums[0].float(), sums[1].float()
