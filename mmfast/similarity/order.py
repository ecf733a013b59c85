"""The order of topk_similarity, in one place: larger score first, NaN above every number (as
torch.topk), −0.0 equal to +0.0, and among equal scores the lower column index first.

Scores become int64 rank keys that encode that order with no ties: the high 32 bits are the fp32
score mapped to an int32 that sorts like the float (NaN canonicalised to the largest key), the low
32 bits are 2^32 − 1 − column (indices < 2^32, so they fit). One torch.topk over rank keys then
selects, and sorts, exactly what the rule says, with no reliance on how torch.topk breaks ties.
"""
from __future__ import annotations

import torch
from torch import Tensor

_LOW = (1 << 32) - 1
NAN_KEY = (1 << 31) - 1


def ordered_int32(scores: Tensor) -> Tensor:
    """fp32 scores → int32 keys with the same order; NaN → the largest key (2^31 − 1, above +inf's);
    −0.0 and +0.0 → 0. (triton_kernels._ordered computes the same keys in-kernel.)"""
    bits = torch.where(scores == 0, 0.0, scores).contiguous().view(torch.int32)  # −0.0 → +0.0
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return torch.where(torch.isnan(scores), NAN_KEY, keys)


def float_from_ordered(keys: Tensor) -> Tensor:
    """The inverse of ordered_int32 (NaN comes back as a NaN (bits 0x7FFFFFFF), −0.0 as +0.0)."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def rank_keys(scores: Tensor, columns: Tensor) -> Tensor:
    """int64 keys, larger = ranked earlier; columns (int64) broadcast against scores (fp32)."""
    return (ordered_int32(scores).to(torch.int64) << 32) + (_LOW - columns)


def decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """rank keys → (fp32 scores, int64 columns)."""
    return float_from_ordered(keys >> 32), _LOW - (keys & _LOW)


def top(keys: Tensor, k: int) -> Tensor:
    """The k largest rank keys per row, sorted descending (they are distinct: no ties to break)."""
    return torch.topk(keys, k, dim=1, sorted=True).values
