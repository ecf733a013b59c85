"""The `reference` backend: the full (N, M) score matrix, then a sort. The baseline in benchmarks
and a second opinion in tests; holds N×M memory. fp32 arithmetic (fp64 for fp64 inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.similarity import order


def scores(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> Tensor:
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return scale.to(dtype).reshape(()) * (a @ b.T)


def similarity(a, b, scale, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    return scores(a, b, scale, normalize).to(out_dtype)


def topk_similarity(q, keys, k: int, scale, normalize: bool):
    s = scores(q, keys, scale, normalize).float()
    columns = torch.arange(s.shape[1], device=s.device)
    return order.decode(order.top(order.rank_keys(s, columns), k))
