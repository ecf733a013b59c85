"""Pieces shared by the Triton kernels of every op family (imported only by the triton backend)."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from mmfast._backends import fp32_matmul_allows_tf32

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Where Triton 3.9's CPU interpreter departs from the GPU, the kernels' helpers work around it
# (mm, downcast); on a GPU these branches compile away.
IN_INTERPRETER = tl.constexpr(INTERPRET)

# Row and column counts reach the kernels as int32 (loop counters, tile ends such as col0 + BLOCK),
# and offsets inside a tile (r·D with r < MAX_BLOCK rows) are int32 too: sizes are kept below these
# limits by check_sizes, so that only tile bases (row0·D, row0·M, part·L, ...) need 64 bits (wide()).
MAX_BLOCK = 256
COUNT_LIMIT = 2**31 - 2**16
WIDTH_LIMIT = 2**31 // MAX_BLOCK


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a·b with fp32 accumulation. The interpreter multiplies bf16/fp16 tiles wrongly in tl.dot: there
    they are upcast to fp32 first, which gives the same products (fp32 accumulation, as on tensor cores)."""
    if IN_INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def downcast(x, DTYPE: tl.constexpr):
    """fp32 x as DTYPE, rounded to nearest (ties to even) as the GPU does. Triton 3.9's interpreter
    truncates fp32 → bf16 (twice the rounding error, which the tests would see); there the rounding
    is done on the bits (bf16 is fp32's upper half), NaN kept a quiet NaN."""
    if IN_INTERPRETER and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        upper = tl.where(x != x, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def wide(x):
    """x as int64: block starts times D can pass 2^31, so they are formed as 64-bit scalars once
    per tile; offsets inside a tile stay int32 (cheap in registers)."""
    return x + tl.full([], 0, tl.int64)


@triton.jit
def tile_offsets(row0, col0, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) int64 offsets of rows row0… and columns col0… of a row-major matrix with
    `stride` elements per row. The row term is int64 per row: r·stride alone passes 2^31 once
    stride > 2^31 / BLOCK_M (an N×M output with M > 2^24 at 128-row tiles)."""
    rows = wide(row0) + tl.arange(0, BLOCK_M)
    return rows[:, None] * stride + (col0 + tl.arange(0, BLOCK_N))[None, :]


def check_sizes(op: str, width: int = 0, **counts: int) -> None:
    """ValueError naming the size when a count or the feature width is past what the kernels index
    with int32 (see COUNT_LIMIT, WIDTH_LIMIT)."""
    for name, count in counts.items():
        if count >= COUNT_LIMIT:
            raise ValueError(f"{op} (triton backend): {name} = {count}; the kernels take counts below "
                             f"{COUNT_LIMIT} (use backend='torch')")
    if width >= WIDTH_LIMIT:
        raise ValueError(f"{op} (triton backend): feature width {width}; the kernels take fewer than "
                         f"{WIDTH_LIMIT} (use backend='torch')")


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for fp32 tiles only where torch itself would use it."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # ignored for bf16/fp16 tiles, which always run on tensor cores


def alert_nondeterministic(op: str) -> None:
    """As torch's own nondeterministic ops: under torch.use_deterministic_algorithms(True) raise a
    RuntimeError naming the op (warn_only=True: a warning)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{op} on the triton backend adds into its outputs with fp32 atomics, so its results are "
               f"not bit-for-bit repeatable, but torch.use_deterministic_algorithms(True) is set: pass "
               f"backend='torch' (or 'cpu' for CPU tensors), or turn determinism off")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 and so on)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def max_programs(device: torch.device, interpreted: int) -> int:
    """How many programs fill the GPU: 4 per SM (enough resident warps to hide memory latency, and
    a bound on per-program partials); `interpreted` under the CPU interpreter (a few, so the tests
    cross the merges of per-program partials)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreted


# 1024 entries per program (8 per thread at 4 warps): the merge reads 12 bytes per partial, so it
# is memory-bound; the interpreter's 32 makes small tests cross program edges.
_MERGE_BLOCK = 32 if INTERPRET else 1024


@triton.jit
def _lse_merge_kernel(max_ptr, sum_ptr, out_ptr, PARTS, L, BLOCK: tl.constexpr):
    """out_j = log Σ_p sum_pj·e^(max_pj) over PARTS rows of (PARTS, L) partials (max fp32, sum of
    exp against it fp64), in fp64, parts in a fixed order (deterministic). A column whose every max
    is −inf gives −inf; NaN in any part gives NaN."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < L
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for p in range(0, PARTS):
        top = tl.maximum(top, tl.load(max_ptr + wide(p) * L + j, mask=ok, other=float("-inf")))
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK,), tl.float64)
    for p in range(0, PARTS):  # lanes past L add 1·e^0 (their log is never stored, but stays finite)
        part = wide(p) * L + j
        mx = tl.load(max_ptr + part, mask=ok, other=0.0)
        total += tl.load(sum_ptr + part, mask=ok, other=1.0) * tl.exp(mx - ref).to(tl.float64)
    tl.store(out_ptr + j, ref.to(tl.float64) + tl.log(total), mask=ok)


def merge_lse(mx: Tensor, sums: Tensor) -> Tensor:
    """(PARTS, L) partials (max fp32, sum fp64) → (L,) fp64 logsumexp, with no (PARTS, L) temporary."""
    parts, length = mx.shape
    out = sums.new_empty(length)
    if length:
        with on_device(mx):
            wrap_triton(_lse_merge_kernel)[(triton.cdiv(length, _MERGE_BLOCK),)](
                mx, sums, out, parts, length, BLOCK=_MERGE_BLOCK)
    return out
