"""Checks and the chunked rank count shared by the evaluation functions."""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _checks
from mmfast.similarity import order

# Scores formed per chunk of the rank count (rows × columns): 2^22, as the torch backend's top-k.
CHUNK_ELEMS = 1 << 22


def embeddings(name: str, x, like: Tensor | None = None, like_name: str = "") -> Tensor:
    """A non-empty (rows, D) float tensor with finite entries (on like's device, with like's D) → fp32."""
    x = _checks.features(name, x)
    _checks.nonempty(name, x)
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {x.device}")
        if x.shape[1] != like.shape[1]:
            raise ValueError(f"{name} must have the feature size D={like.shape[1]} of {like_name}, got D={x.shape[1]}")
    if _checks.checking_values() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN or infinite entries; a ranking of them would mean nothing")
    return x.float()


def index_vector(name: str, v, length: int, bound: int, device: torch.device, what: str) -> Tensor:
    """An integer tensor of shape (length,) with values in [0, bound) → int64."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(v).__name__}")
    if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (int64), got {v.dtype}")
    if v.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one entry per {what}), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} must be on the embeddings' device ({device}), got {v.device}")
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} values must be in [0, {bound}); got values in [{lo}, {hi}]")
    return v.long()


def ks_arg(ks) -> tuple[int, ...]:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be a sequence of ints, got {type(ks).__name__}") from None
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return ks


def first_hit(hit: Tensor) -> Tensor:
    """(rows, K) bool → 1-based position of each row's first True, or 0 where none."""
    pos = hit.to(torch.int8).argmax(1) + 1  # argmax returns the first maximum
    return torch.where(hit.any(1), pos, 0)


def ranks_after_topk(queries: Tensor, keys: Tensor, pair_query: Tensor, pair_key: Tensor, k: int) -> Tensor:
    """1-based rank of each query's best correct key, for queries whose correct keys all rank below
    the top k (so the rank is > k), by two chunked passes with the same GEMM chunks (so the same
    fp32 scores):
      1. best[q] = the highest rank key (order.py: score, then lower column) of q's correct keys;
      2. rank[q] = 1 + #{columns whose rank key is above best[q]}.
    pair_query/pair_key: the correct (query row, key column) pairs. Memory O(rows·chunk).
    The result is at least k + 1: where a near-tie's last bit differs between this GEMM and the
    top-k's, the top-k's verdict stands (the two then agree on R@k and on the rank)."""
    n = queries.shape[0]
    lowest = torch.iinfo(torch.int64).min
    best = torch.full((n,), lowest, dtype=torch.int64, device=queries.device)
    order_pairs = torch.argsort(pair_key)
    pair_query, pair_key = pair_query[order_pairs], pair_key[order_pairs]
    for r0, c0, s in _score_chunks(queries, keys):
        lo, hi = torch.searchsorted(pair_key, torch.tensor([c0, c0 + s.shape[1]], device=pair_key.device)).tolist()
        pq, pk = pair_query[lo:hi], pair_key[lo:hi]
        mine = (pq >= r0) & (pq < r0 + s.shape[0])
        pq, pk = pq[mine], pk[mine]
        rank = order.rank_keys(s[pq - r0, pk - c0], pk)
        best.scatter_reduce_(0, pq, rank, "amax")
    above = torch.zeros(n, dtype=torch.int64, device=queries.device)
    for r0, c0, s in _score_chunks(queries, keys):
        columns = torch.arange(c0, c0 + s.shape[1], device=s.device)
        above[r0:r0 + s.shape[0]] += (order.rank_keys(s, columns) > best[r0:r0 + s.shape[0], None]).sum(1)
    return torch.clamp(above + 1, min=k + 1)


def _score_chunks(queries: Tensor, keys: Tensor):
    """(row0, col0, fp32 scores of that chunk), row blocks × column chunks, always the same partition."""
    rows = min(queries.shape[0], 1024)
    cols = max(1, CHUNK_ELEMS // rows)
    for r0 in range(0, queries.shape[0], rows):
        for c0 in range(0, keys.shape[0], cols):
            yield r0, c0, queries[r0:r0 + rows] @ keys[c0:c0 + cols].T


def median(x: Tensor) -> float:
    """The median (the mean of the two middle values for an even count, as numpy's)."""
    s = x.double().sort().values
    return float((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2)
