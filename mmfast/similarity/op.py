"""The similarity family's registered ops.

    similarity(a, b, scale, normalize, out_dtype) → S = scale·n(a)·n(b)ᵀ (N, M) in out_dtype
    topk_similarity(q, keys, k, scale, normalize) → per row of S its k largest entries, sorted, and
        their columns (int64): values (N, k) fp32, indices (N, k); ties to the lower column,
        NaN above every number (order.py). No gradient.

`similarity` is differentiable: its backward is the op similarity_backward (chunked.py), the same
two GEMMs on every backend (G is N×M whatever computes it). Both are torch.library custom ops with
fake implementations, so torch.compile(fullgraph=True) keeps each as a single node.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast._backends import first_order_only, no_autocast
from mmfast.similarity import chunked, reference


def _cpu_similarity(a, b, scale, normalize, out_dtype):
    return torch.ops.mmfast.cpu_similarity(a, b, float(scale.detach()), normalize, out_dtype)


def _cpu_topk(q, keys, k, scale, normalize):
    return torch.ops.mmfast.cpu_topk_similarity(q, keys, k, float(scale.detach()), normalize)


def _triton_similarity(a, b, scale, normalize, out_dtype):
    from mmfast.similarity import triton_kernels  # imports triton: only once this backend runs

    return triton_kernels.triton_similarity(a, b, scale, normalize, out_dtype)


def _triton_topk(q, keys, k, scale, normalize):
    from mmfast.similarity import triton_kernels

    return triton_kernels.triton_topk_similarity(q, keys, k, scale, normalize)


def _cuda_similarity(a, b, scale, normalize, out_dtype):
    from mmfast.similarity import cuda_kernels  # resolves the CUDA library only once this backend runs

    return cuda_kernels.cuda_similarity(a, b, scale, normalize, out_dtype)


def _cuda_topk(q, keys, k, scale, normalize):
    from mmfast.similarity import cuda_kernels

    return cuda_kernels.cuda_topk_similarity(q, keys, k, scale, normalize)


# backend name → (similarity, topk_similarity) with the signatures of chunked's.
IMPLS = {
    "reference": (reference.similarity, reference.topk_similarity),
    "torch": (chunked.similarity, chunked.topk_similarity),
    "cpu": (_cpu_similarity, _cpu_topk),
    "triton": (_triton_similarity, _triton_topk),
    "cuda": (_cuda_similarity, _cuda_topk),
}


@torch.library.custom_op("mmfast::similarity", mutates_args=())
def similarity(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, out_dtype: torch.dtype, backend: str) -> Tensor:
    with no_autocast(a):
        return IMPLS[backend][0](a, b, scale, normalize, out_dtype)


@similarity.register_fake
def _(a, b, scale, normalize, out_dtype, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mmfast::similarity_backward", mutates_args=())
def similarity_backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, normalize: bool, need_a: bool,
                        need_b: bool, need_scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """→ (da (N, D) or (0,), db (M, D) or (0,), dscale [] fp32); da/db in the input dtypes."""
    with no_autocast(a):
        return chunked.similarity_backward(grad, a, b, scale, normalize, need_a, need_b, need_scale)


@similarity_backward.register_fake
def _(grad, a, b, scale, normalize, need_a, need_b, need_scale):
    da = a.new_empty(a.shape) if need_a else a.new_empty(0)  # contiguous, as the backward returns
    db = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return da, db, a.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    a, b, scale, normalize, out_dtype, backend = inputs
    ctx.save_for_backward(a, b, scale)  # not S: the backward needs only G and the inputs
    ctx.normalize = normalize


def _backward(ctx, grad):
    a, b, scale = ctx.saved_tensors
    need_a, need_b, need_scale = ctx.needs_input_grad[:3]
    da, db, dscale = similarity_backward(grad, a, b, scale, ctx.normalize, need_a, need_b, need_scale)
    return (
        da if need_a else None,
        db if need_b else None,
        dscale.reshape(scale.shape).to(scale.dtype) if need_scale else None,
        None, None, None,
    )


similarity.register_autograd(_backward, setup_context=_setup_context)
first_order_only(similarity_backward, "mmfast.similarity")


@torch.library.custom_op("mmfast::topk_similarity", mutates_args=())
def topk_similarity(q: Tensor, keys: Tensor, k: int, scale: Tensor, normalize: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    with no_autocast(q):
        return IMPLS[backend][1](q, keys, k, scale, normalize)


@topk_similarity.register_fake
def _(q, keys, k, scale, normalize, backend):
    return q.new_empty((q.shape[0], k), dtype=torch.float32), q.new_empty((q.shape[0], k), dtype=torch.int64)
