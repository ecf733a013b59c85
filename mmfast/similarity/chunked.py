"""The `torch` backend of the similarity family: chunked PyTorch, any device. Also the backward of
`similarity`, which every backend shares.

S = s·n(A)·n(B)ᵀ. Every backend folds s and the row norms of A into one O(N·D) fp32 copy,
A' = s·n(A), and takes B' = n(B) (or, in the top-k, B with its inverse norms applied to S's
columns), so the N×M work is one GEMM and nothing else.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.similarity import order

# F.normalize's eps: a row of norm below it is divided by eps (so a zero row gives zero scores).
NORM_EPS = 1e-12
# Scores formed per chunk of the top-k (rows × columns): 2^22 (16 MB fp32 + 32 MB of int64 rank
# keys), large enough for full-speed GEMMs, far below an N×M buffer.
CHUNK_ELEMS = 1 << 22
# Rows of the gradient G converted to fp32 at a time in the backward (at most 2^22 entries).
BACKWARD_CHUNK_ELEMS = 1 << 22


def inverse_norms(x32: Tensor) -> Tensor:
    """1 / max(‖x_i‖, eps) per row, fp32 (N,)."""
    return torch.linalg.vector_norm(x32, dim=1).clamp_min(NORM_EPS).reciprocal()


def factors(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """The fused kernels' epilogue factors, S_ij = (a_i·b_j)·row_i·col_j: (s/‖a_i‖ (N,), 1/‖b_j‖ (M,))
    fp32, or (s, 1) broadcast when not normalising."""
    s = scale.float().reshape(())
    if normalize:
        return inverse_norms(a.float()) * s, inverse_norms(b.float())
    return s.expand(a.shape[0]).contiguous(), b.new_ones(b.shape[0], dtype=torch.float32)


def topk_segments(n: int, m: int, programs: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(segments, columns per segment) of a fused top-k grid of ⌈n / block_m⌉ row blocks: with few
    row blocks (small N) the columns are split too, in segments of whole tiles (at least 4), so that
    about `programs` blocks run."""
    row_blocks = max(1, -(-n // block_m))
    segments = max(1, min(-(-programs // row_blocks), -(-m // (4 * block_n))))
    seg_cols = -(-(-(-m // segments)) // block_n) * block_n
    return -(-m // seg_cols), seg_cols


def scaled_rows(x: Tensor, scale, normalize: bool) -> Tensor:
    """scale·n(x) as fp32 (rows, D) (scale: a float or a 0-d tensor)."""
    x32 = x.float()
    if normalize:
        return x32 * (inverse_norms(x32) * scale).unsqueeze(1)
    return x32 * scale


def _scale_value(scale: Tensor) -> Tensor:
    return scale.float().reshape(())


def similarity(a: Tensor, b: Tensor, scale: Tensor, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    a1 = scaled_rows(a, _scale_value(scale), normalize)
    b1 = scaled_rows(b, 1.0, normalize)
    out = a1.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
    if out_dtype == torch.float32:
        return torch.mm(a1, b1.T, out=out)
    step = max(1, CHUNK_ELEMS // max(b.shape[0], 1))  # no N×M fp32 temporary for bf16/fp16 outputs
    for i in range(0, a.shape[0], step):
        out[i:i + step] = a1[i:i + step] @ b1.T
    return out


def topk_similarity(q: Tensor, keys: Tensor, k: int, scale: Tensor, normalize: bool):
    """Row blocks × column chunks; each chunk's top min(k, cols) is merged into the block's running
    top k by one topk over the 2k candidates' rank keys (order.py)."""
    n, m = q.shape[0], keys.shape[0]
    q1 = scaled_rows(q, _scale_value(scale), normalize)
    k32 = keys.float()
    col_scale = inverse_norms(k32) if normalize else None
    rows = min(n, 256)
    cols = max(1, CHUNK_ELEMS // rows)
    values = q1.new_empty((n, k))
    indices = q1.new_empty((n, k), dtype=torch.int64)
    for i0 in range(0, n, rows):
        best = None
        for j0 in range(0, m, cols):
            s = q1[i0:i0 + rows] @ k32[j0:j0 + cols].T
            if col_scale is not None:
                s *= col_scale[j0:j0 + cols]
            chunk = _chunk_top(s, j0, min(k, s.shape[1]))
            best = chunk if best is None else order.top(torch.cat([best, chunk], dim=1), min(k, best.shape[1] + chunk.shape[1]))
        values[i0:i0 + rows], indices[i0:i0 + rows] = order.decode(best)
    return values, indices


def _chunk_top(s: Tensor, j0: int, kk: int) -> Tensor:
    """Rank keys of the top kk of each row of the chunk s (columns j0…), sorted. torch.topk picks
    the set; it is the rule's set unless more than kk entries reach the row's kk-th value (a tie
    at the boundary, where torch.topk's choice is unspecified, or NaNs): those rows are redone
    from the rank keys of the whole row."""
    vals, cols = torch.topk(s, kk, dim=1, sorted=True)
    reach = (~(s < vals[:, -1:])).sum(1)  # entries >= the kk-th value, NaNs included
    rank = order.top(order.rank_keys(vals, cols + j0), kk)
    tied = torch.nonzero(reach > kk)[:, 0]
    if len(tied):
        columns = torch.arange(j0, j0 + s.shape[1], device=s.device)
        rank[tied] = order.top(order.rank_keys(s[tied], columns), kk)
    return rank


def similarity_backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, normalize: bool, need_a: bool,
                        need_b: bool, need_scale: bool):
    """For S = s·â·b̂ᵀ (â = n(a), b̂ = n(b)) and G = ∂L/∂S:
    ∂L/∂â = s·G·b̂, ∂L/∂b̂ = s·Gᵀ·â, ∂L/∂s = Σ_i â_i·(G·b̂)_i, then through n: for ‖x‖ ≥ eps,
    ∂L/∂x = (∂L/∂x̂ − x̂·(x̂·∂L/∂x̂)) / ‖x‖; below eps n(x) = x/eps and ∂L/∂x = (∂L/∂x̂) / eps.
    G is converted to fp32 a row chunk at a time. → (da or (0,), db or (0,), dscale fp32 [], 0 unless need_scale)."""
    s = _scale_value(scale)
    a32, b32 = a.float(), b.float()
    a_hat = scaled_rows(a32, 1.0, normalize)
    b_hat = scaled_rows(b32, 1.0, normalize)
    need_gb = need_a or need_scale
    gb = a32.new_empty(a32.shape) if need_gb else None  # G·b̂
    gta = b32.new_zeros(b32.shape) if need_b else None  # Gᵀ·â
    step = max(1, BACKWARD_CHUNK_ELEMS // max(b.shape[0], 1))
    for i in range(0, a.shape[0], step):
        g = grad[i:i + step].float()
        if need_gb:
            torch.mm(g, b_hat, out=gb[i:i + step])
        if need_b:
            gta.addmm_(g.T, a_hat[i:i + step])
    dscale = (gb * a_hat).sum(dtype=torch.float64).float() if need_scale else a32.new_zeros(())
    da = _through_norm(s * gb, a32, a_hat, normalize).to(a.dtype) if need_a else a.new_empty(0)
    db = _through_norm(s * gta, b32, b_hat, normalize).to(b.dtype) if need_b else b.new_empty(0)
    return da, db, dscale


def _through_norm(d_hat: Tensor, x32: Tensor, x_hat: Tensor, normalize: bool) -> Tensor:
    if not normalize:
        return d_hat
    norm = torch.linalg.vector_norm(x32, dim=1, keepdim=True)
    radial = torch.where(norm >= NORM_EPS, (x_hat * d_hat).sum(1, keepdim=True), 0.0)
    return (d_hat - x_hat * radial) / norm.clamp_min(NORM_EPS)
