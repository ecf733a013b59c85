"""The `cuda` backend of the similarity family: kernels/similarity.cu, through mmfast._cuda.

similarity: one block per 128 × 128 tile of S: the tile's GEMM (warp_mma: bf16/fp16 tensor cores,
  fp32 as TF32 where torch allows it, else exact fp32; fp32 accumulation), then the epilogue
  S = acc·(s/‖a_i‖)·(1/‖b_j‖) with the row and column factors computed here, stored in out_dtype.
  2·N·M·D FLOPs, S written once.
topk_similarity: grid (64-row blocks, column segments). A block walks its segment in 128-column
  tiles; after each tile's GEMM, scores become int32 keys that sort like the floats (order.py) and
  each row's candidates above its k-th key are merged into the row's sorted list of k (key, column)
  in shared memory, 32 at a time by one warp. The kernel writes each segment's list as int64 rank
  keys (order.py); the segments are merged here by one torch.topk over them (none when there is one
  segment: its list is already sorted). Memory: segments·N·k·8 bytes. Limits as the Triton backend:
  k ≤ K_MAX = 64, M ≤ TOPK_MAX_COLUMNS = 2^30; beyond them the torch backend's chunked top-k runs on
  the same device.
Determinism: no atomics; every output entry is written by one block in a fixed order (top-k: exact
  integer keys, merged by a top-k over distinct rank keys), so results repeat bit for bit and
  torch.use_deterministic_algorithms(True) needs no other path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _cuda
from mmfast._backends import fp32_matmul_allows_tf32
from mmfast._cuda import I32, I64, PTR
from mmfast.similarity import chunked, order

K_MAX = 64  # kernels/similarity.cu's topk::K_MAX
TOPK_MAX_COLUMNS = 2**30  # as the Triton backend (the kernel itself takes M < 2^31)
_TOPK_BLOCK_M, _TOPK_BLOCK_N = 64, 128  # kernels/similarity.cu's topk::BM, topk::BN (for the segment count only)

# (a, b, row_scale, col_scale, out, n, m, d, dtype, out_dtype, tf32)
_similarity = _cuda.function("mmfast_similarity", PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I32, I32, I32)
# (q, keys, row_scale, col_scale, ranks, n, m, d, k, seg_cols, dtype, tf32)
_topk = _cuda.function("mmfast_topk_similarity", PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I32, I64, I32, I32)


def _tf32(x: Tensor) -> int:
    """1: fp32 tiles on TF32 tensor cores (where torch would use TF32 too); bf16/fp16 ignore it."""
    return int(x.dtype == torch.float32 and fp32_matmul_allows_tf32())


def cuda_similarity(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    row_scale, col_scale = chunked.factors(a, b, scale, normalize)
    out = a.new_empty((n, m), dtype=out_dtype)
    if n and m:
        _similarity(a, a, b, row_scale, col_scale, out, n, m, d, _cuda.dtype_code(a), _cuda.dtype_code(out), _tf32(a))
    return out


def cuda_topk_similarity(q: Tensor, keys: Tensor, k: int, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    n, m, d = q.shape[0], keys.shape[0], q.shape[1]
    if k > K_MAX or m > TOPK_MAX_COLUMNS:
        return chunked.topk_similarity(q, keys, k, scale, normalize)  # see the module docstring
    q, keys = q.contiguous(), keys.contiguous()
    row_scale, col_scale = chunked.factors(q, keys, scale, normalize)
    programs = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count  # about 4 blocks per SM
    segments, seg_cols = chunked.topk_segments(n, m, programs, _TOPK_BLOCK_M, _TOPK_BLOCK_N)
    ranks = q.new_empty((segments, n, k), dtype=torch.int64)
    if n:
        _topk(q, q, keys, row_scale, col_scale, ranks, n, m, d, k, seg_cols, _cuda.dtype_code(q), _tf32(q))
    # Merge the segments' lists (a segment with fewer than k columns pads with keys below every real
    # one, never among the k best as m >= k).
    best = ranks[0] if segments == 1 else order.top(ranks.permute(1, 0, 2).reshape(n, segments * k), k)
    return order.decode(best)
