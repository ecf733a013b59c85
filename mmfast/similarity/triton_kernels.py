"""The `triton` backend of the similarity family (the contrastive family's tile helpers reused).

similarity: one program per (BLOCK_M × BLOCK_N) tile of S: the tile's GEMM (fp32 accumulation),
  then the epilogue S = acc·(s/‖a_i‖)·(1/‖b_j‖) (the row and column factors, O(N + M), computed
  by torch beforehand), stored in the output dtype. 2·N·M·D FLOPs, S written once.
topk_similarity: the grid is (row blocks, column segments). A program walks its segment's tiles
  in column order and keeps, per row, the running top k in registers: KP = next power of two ≥ k
  slots of (rank key, column), unsorted. Scores become int32 keys that sort like the floats (NaN
  largest; order.py), so comparisons are exact integer ones. Per tile: while some row's tile
  maximum beats its worst kept key (strictly: a later column with an equal key ranks lower), each
  such row takes its tile maximum (the lowest column among equal keys) into its worst slot (the
  lowest key, the highest column among equal keys) and masks it out of the tile; most tiles of a
  random-like row block exit after one test. The segments' KP-lists are merged on the host by one
  torch.topk over int64 rank keys (order.py). Memory: segments·N·KP·8 bytes.
  Limits: k ≤ K_MAX = 64 (registers: BLOCK_M·KP keys and columns per program); a larger k, or
  M > TOPK_MAX_COLUMNS = 2^30 (columns and segment ends, up to 1.5·M, are int32 in-kernel), is
  served by the torch backend's chunked top-k on the same device (torch ops, not this kernel).
Determinism: both kernels write each output entry from one program (top-k: exact integer keys,
  merged by a top-k over distinct rank keys), so results repeat bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from mmfast._triton import INTERPRET, check_sizes, downcast, max_programs, on_device, precision, tile_offsets, wide
from mmfast.contrastive.triton_kernels import _unscaled_logits
from mmfast.similarity import chunked, order

K_MAX = 64
TOPK_MAX_COLUMNS = 2**30
INT32_MIN = tl.constexpr(-(1 << 31))  # a global read inside kernels must be a constexpr (the GPU compiler checks; the interpreter does not)

if INTERPRET:
    # The CPU interpreter: 32-wide tiles so tests at small sizes cross tile and segment edges.
    _SIM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    _TOPK_BLOCK_M, _TOPK_BLOCK_N = 32, 32
    _TOPK_CONFIGS = [triton.Config({"BLOCK_K": 32})]
else:
    # Not yet measured on a GPU: 128-wide tiles for Hopper, a 4-warp fallback.
    _SIM_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]
    # BLOCK_M and BLOCK_N are fixed (they set the grid and the segments' alignment); the running
    # lists take BLOCK_M·KP·2 registers' worth per program, so the row block stays at 64.
    _TOPK_BLOCK_M, _TOPK_BLOCK_N = 64, 128
    _TOPK_CONFIGS = [
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_SIM_CONFIGS, key=["D"])
@triton.jit
def _similarity_kernel(a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, out_ptr, N, M, D, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(M, BLOCK_N)
    row0 = pid // col_blocks * BLOCK_M
    col0 = pid % col_blocks * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    acc = _unscaled_logits(a_ptr, b_ptr, row0, col0, N, M, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    row_ok = r < N - row0
    col_ok = c < M - col0
    rs = tl.load(row_scale_ptr + row0 + r, mask=row_ok, other=0.0)
    cs = tl.load(col_scale_ptr + col0 + c, mask=col_ok, other=0.0)
    s = acc * rs[:, None] * cs[None, :]
    out = out_ptr + tile_offsets(row0, col0, M, BLOCK_M, BLOCK_N)  # r·M alone passes 2^31 once M > 2^24
    tl.store(out, downcast(s, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ordered(z):
    """fp32 → int32 keys that sort like the floats: NaN largest (2^31 − 1), −0.0 = +0.0 (order.py)."""
    bits = z.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(z == 0.0, 0, key)
    return tl.where(z != z, 0x7FFFFFFF, key)


@triton.jit
def _worst(run_key, run_col, slot, K: tl.constexpr):
    """The kept entry that ranks last: the lowest key, among equal keys the highest column → (key, slot)."""
    live = slot[None, :] < K
    w_key = tl.min(tl.where(live, run_key, 0x7FFFFFFF), axis=1)
    at_min = live & (run_key == w_key[:, None])
    w_col = tl.max(tl.where(at_min, run_col, -2), axis=1)
    w_slot = tl.min(tl.where(at_min & (run_col == w_col[:, None]), slot[None, :], K), axis=1)
    return w_key, w_slot


@triton.autotune(configs=_TOPK_CONFIGS, key=["D", "KP"])
@triton.jit
def _topk_kernel(q_ptr, k_ptr, row_scale_ptr, col_scale_ptr, key_out_ptr, col_out_ptr, N, M, D, seg_cols,
                 K: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    seg_start = seg * seg_cols
    seg_end = tl.minimum(M, seg_start + seg_cols)  # < 1.5·M + BLOCK_N: int32 for M ≤ 2^30 (the host checks)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, KP)
    row_ok = r < N - row0
    rs = tl.load(row_scale_ptr + row0 + r, mask=row_ok, other=0.0)
    run_key = tl.full((BLOCK_M, KP), INT32_MIN, tl.int32)  # below every real key (−inf's included)
    run_col = tl.full((BLOCK_M, KP), -1, tl.int32)
    w_key, w_slot = _worst(run_key, run_col, slot, K)
    for col0 in range(seg_start, seg_end, BLOCK_N):
        acc = _unscaled_logits(q_ptr, k_ptr, row0, col0, N, seg_end, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        col_ok = c < seg_end - col0
        cs = tl.load(col_scale_ptr + col0 + c, mask=col_ok, other=0.0)
        key = tl.where(row_ok[:, None] & col_ok[None, :], _ordered(acc * rs[:, None] * cs[None, :]), INT32_MIN)
        cols = col0 + c
        tile_max = tl.max(key, axis=1)
        pending = tile_max > w_key
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            col = tl.min(tl.where(key == tile_max[:, None], cols[None, :], 0x7FFFFFFF), axis=1)
            take = pending[:, None] & (slot[None, :] == w_slot[:, None])
            run_key = tl.where(take, tile_max[:, None], run_key)
            run_col = tl.where(take, col[:, None], run_col)
            key = tl.where(pending[:, None] & (cols[None, :] == col[:, None]), INT32_MIN, key)
            w_key, w_slot = _worst(run_key, run_col, slot, K)
            tile_max = tl.max(key, axis=1)
            pending = tile_max > w_key
    out = (wide(seg) * N + row0) * KP
    tl.store(key_out_ptr + out + r[:, None] * KP + slot[None, :], run_key, mask=row_ok[:, None])
    tl.store(col_out_ptr + out + r[:, None] * KP + slot[None, :], run_col, mask=row_ok[:, None])


@triton_op("mmfast::triton_similarity", mutates_args=())
def triton_similarity(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    check_sizes("similarity", d, N=n, M=m)
    row_scale, col_scale = chunked.factors(a, b, scale, normalize)
    out = a.new_empty((n, m), dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    with on_device(a):
        wrap_triton(_similarity_kernel)[grid](a, b, row_scale, col_scale, out, n, m, d, PRECISION=precision(a.dtype))
    return out


@triton_op("mmfast::triton_topk_similarity", mutates_args=())
def triton_topk_similarity(q: Tensor, keys: Tensor, k: int, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    n, m, d = q.shape[0], keys.shape[0], q.shape[1]
    if k > K_MAX or m > TOPK_MAX_COLUMNS:
        return chunked.topk_similarity(q, keys, k, scale, normalize)  # see the module docstring
    check_sizes("topk_similarity", d, N=n)
    q, keys = q.contiguous(), keys.contiguous()
    row_scale, col_scale = chunked.factors(q, keys, scale, normalize)
    kp = max(16, triton.next_power_of_2(k))
    row_blocks = triton.cdiv(n, _TOPK_BLOCK_M)
    segments, seg_cols = chunked.topk_segments(n, m, max_programs(q.device, interpreted=4), _TOPK_BLOCK_M,
                                               _TOPK_BLOCK_N)
    key_out = q.new_empty((segments, n, kp), dtype=torch.int32)
    col_out = q.new_empty((segments, n, kp), dtype=torch.int32)
    with on_device(q):
        wrap_triton(_topk_kernel)[(row_blocks, segments)](
            q, keys, row_scale, col_scale, key_out, col_out, n, m, d, seg_cols, K=k, KP=kp,
            PRECISION=precision(q.dtype), BLOCK_M=_TOPK_BLOCK_M, BLOCK_N=_TOPK_BLOCK_N,
        )
    # Merge the segments' lists (empty slots: the lowest key, never among the k best as m >= k).
    rank = (key_out.to(torch.int64) << 32) + ((1 << 32) - 1 - col_out.to(torch.int64))
    best = order.top(rank.permute(1, 0, 2).reshape(n, segments * kp), k)
    return order.decode(best)
