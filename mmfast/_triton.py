"""Pieces shared by the Triton kernels of every op family (imported only by the triton backend)."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton 3.9's CPU interpreter multiplies bf16/fp16 tiles wrongly in tl.dot; there, mm upcasts
# them to fp32 first, which gives the same products (fp32 accumulation, as on tensor cores).
UPCAST_DOTS = tl.constexpr(INTERPRET)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a·b with fp32 accumulation."""
    if UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def wide(x):
    """x as int64: block starts times D can pass 2^31, so they are formed as 64-bit scalars once
    per tile; offsets inside a tile stay int32 (cheap in registers)."""
    return x + tl.full([], 0, tl.int64)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for fp32 tiles only where torch itself would use it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for bf16/fp16 tiles, which always run on tensor cores


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 and so on)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
