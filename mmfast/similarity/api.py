"""Public similarity ops: argument checks, backend choice, then the registered ops (op.py).

S = scale·n(A)·n(B)ᵀ, n the optional L2 normalisation (F.normalize's: x / max(‖x‖, 1e-12)).
scale is a float or a tensor of shape [] or [1]; any finite value (0 and negatives included: S is
then just scaled, and a negative scale reverses the top-k's order).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _backends, _checks
from mmfast.similarity import op


def similarity(
    a: Tensor,
    b: Tensor,
    *,
    scale: _checks.Scalar = 1.0,
    normalize: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """S = scale·n(a)·n(b)ᵀ, (N, M), in one pass: normalisation, matmul and scale fused.

    a: (N, D), b: (M, D), float32/bfloat16/float16 (the same). Computed in fp32 and written in
    out_dtype (default: the inputs' dtype). Differentiable in a, b and a tensor scale (the
    backward recomputes the norms; it keeps a, b and scale, not S).
    """
    _checks.plain_autograd("similarity")
    a, b, scale = _operands("a", a, "b", b, scale)
    if out_dtype is None:
        out_dtype = a.dtype
    if out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16, float16 or None, got {out_dtype!r}")
    return op.similarity(a, b, scale, _flag("normalize", normalize), out_dtype, _backends.select(backend, a.device))


def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    scale: _checks.Scalar = 1.0,
    normalize: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """For each query, the k keys of highest similarity scale·n(q)·n(key), streamed: memory
    O(N·k + a tile), never the (N, M) matrix.

    queries: (N, D), keys: (M, D), 1 <= k <= M. Returns (values (N, k) fp32, indices (N, k)
    int64), sorted by descending value; among equal values the lower key index comes first; NaN
    ranks above every number (as in torch.topk). Values are fp32 whatever the inputs' dtype (the
    scores the selection compared: rounding them to bf16 would create ties it did not see).
    No gradient flows through it.
    """
    queries, keys, scale = _operands("queries", queries, "keys", keys, scale)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, M] = [1, {keys.shape[0]}] (M = number of keys), got {k}")
    name = _backends.select(backend, queries.device)
    return op.topk_similarity(queries.detach(), keys.detach(), k, scale.detach(), _flag("normalize", normalize), name)


def _operands(a_name: str, a, b_name: str, b, scale):
    a = _checks.features(a_name, a)
    b = _checks.features(b_name, b, a, a_name)
    _checks.nonempty(a_name, a)
    _checks.nonempty(b_name, b)
    return a, b, _checks.scalar("scale", scale, a.device, positive=False)


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v
