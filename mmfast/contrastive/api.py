"""Public contrastive losses: argument checks, then each loss built from the contrastive_stats op.

Notation (design.md §1.1): A (N, D), B (M, D), s the logit scale, b the bias, Z = s·A·Bᵀ + b,
r = row logsumexp, c = column logsumexp. With label smoothing ε, a row's term is
r_i − (1 − ε)·Z_i,y − ε·mean_j Z_ij, and mean_j Z_ij = s·A_i·mean(B) + b costs O(N·D).
The op's statistics are fp64, so each loss is summed in fp64 and returned in fp32; gradients come
back in the features' dtype. The O(N·D) terms are element-wise products (never matmuls) so that
autocast leaves them in fp32, like the op itself. Under TF32 matmuls on a GPU the kernels' logits
carry TF32 rounding while the positive logit Z_ii here is exact fp32: the loss of a solved batch
can then come out slightly negative (≈ −1e-2 at scale 100), within TF32's error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _backends, _checks
from mmfast.contrastive import reference
from mmfast.contrastive.op import contrastive_stats

REDUCTIONS = ("mean", "sum", "none")


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: _checks.Scalar,
    *,
    logit_bias: Optional[_checks.Scalar] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Symmetric CLIP InfoNCE loss, open_clip's ClipLoss value, without the N×N logits.

    image_features: (N, D), text_features: (N, D); row i of each is a positive pair. logit_scale is
    used as given (pass logit_scale.exp() as open_clip does); logit_bias is added to every logit.
    reduction "none" gives (N,): per pair, the average of its image→text and text→image terms.
    """
    _checks.plain_autograd("clip_loss")
    a = _checks.features("image_features", image_features)
    b = _checks.features("text_features", text_features, a, "image_features")
    _checks.nonempty("image_features", a)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"clip_loss pairs row i of image_features with row i of text_features: expected the same "
            f"number of rows, got {a.shape[0]} and {b.shape[0]} (infonce_loss takes N != M)"
        )
    scale, bias, eps = _scale_bias_smoothing(logit_scale, logit_bias, label_smoothing, a.device)
    _checks.choice("reduction", reduction, REDUCTIONS)
    name = _backends.select(backend, a.device)
    if name == "reference":
        return reference.clip_loss(a, b, scale, bias, eps, reduction)

    row, col = contrastive_stats(a, b, scale, bias, None, False, True, name)
    s, bf = _as_f32(scale), _as_f32(bias)
    a32, b32 = a.float(), b.float()
    pos = s * (a32 * b32).sum(1) + bf  # Z_ii
    image_terms = _smoothed(row, pos, lambda: s * (a32 * b32.mean(0)).sum(1) + bf, eps)
    text_terms = _smoothed(col, pos, lambda: s * (b32 * a32.mean(0)).sum(1) + bf, eps)
    return _checks.reduce(0.5 * (image_terms + text_terms), reduction).float()


def infonce_loss(
    query: Tensor,
    keys: Tensor,
    logit_scale: _checks.Scalar,
    *,
    labels: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """One-directional InfoNCE: query i against every key (and every extra negative).

    query: (N, D), keys: (M, D), negatives: (K, D) or None, an extra bank (e.g. a MoCo queue)
    appended to the keys; it gets a gradient only if it requires one. labels: (N,) int64, the index
    into keys of each query's positive (default arange(N), which needs M >= N).
    reduction "none" gives (N,).
    """
    _checks.plain_autograd("infonce_loss")
    q = _checks.features("query", query)
    k = _checks.features("keys", keys, q, "query")
    _checks.nonempty("query", q)
    _checks.nonempty("keys", k)
    if negatives is not None:
        negatives = _checks.features("negatives", negatives, q, "query")
    labels = _labels(labels, q.shape[0], k.shape[0], q.device)
    scale, _, eps = _scale_bias_smoothing(logit_scale, None, label_smoothing, q.device)
    _checks.choice("reduction", reduction, REDUCTIONS)
    name = _backends.select(backend, q.device)
    if name == "reference":
        return reference.infonce_loss(q, k, scale, labels, negatives, eps, reduction)

    row, _ = contrastive_stats(q, k, scale, None, None, False, False, name)
    q32, k32 = q.float(), k.float()
    key_sum, n_keys = k32.sum(0), k.shape[0]
    if negatives is not None:
        neg_row, _ = contrastive_stats(q, negatives, scale, None, None, False, False, name)
        row = torch.logaddexp(row, neg_row)
        key_sum, n_keys = key_sum + negatives.float().sum(0), n_keys + negatives.shape[0]
    s = _as_f32(scale)
    pos = s * (q32 * k32[labels]).sum(1)
    return _checks.reduce(_smoothed(row, pos, lambda: s * (q32 * key_sum).sum(1) / n_keys, eps), reduction).float()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: _checks.Scalar,
    logit_bias: Optional[_checks.Scalar],
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Pairwise sigmoid loss, open_clip's SigLipLoss value: −(1/N)·Σ_ij log σ(t_ij·Z_ij), t = +1 on
    the diagonal and −1 elsewhere. image_features: (N, D), text_features: (M, D), M >= N; pairs on
    the diagonal. −log σ(t·z) = softplus(−t·z), summed by the op with t = +1 at each row's positive.
    """
    _checks.plain_autograd("siglip_loss")
    a = _checks.features("image_features", image_features)
    b = _checks.features("text_features", text_features, a, "image_features")
    _checks.nonempty("image_features", a)
    if b.shape[0] < a.shape[0]:
        raise ValueError(
            f"text_features needs at least as many rows as image_features (positives on the diagonal), "
            f"got {b.shape[0]} < {a.shape[0]}"
        )
    scale, bias, _ = _scale_bias_smoothing(logit_scale, logit_bias, 0.0, a.device)
    name = _backends.select(backend, a.device)
    if name == "reference":
        return reference.siglip_loss(a, b, scale, bias)

    positives = torch.arange(a.shape[0], device=a.device)
    row, _ = contrastive_stats(a, b, scale, bias, positives, True, False, name)
    return (row.sum() / a.shape[0]).float()


def _scale_bias_smoothing(logit_scale, logit_bias, label_smoothing, device):
    scale = _checks.scalar("logit_scale", logit_scale, device, positive=True)
    bias = None if logit_bias is None else _checks.scalar("logit_bias", logit_bias, device, positive=False)
    return scale, bias, _checks.smoothing(label_smoothing)


def _labels(labels: Optional[Tensor], n: int, m: int, device: torch.device) -> Tensor:
    if labels is None:
        if n > m:
            raise ValueError(
                f"labels default to arange(N), which needs at least as many keys as queries; got "
                f"N={n} queries and M={m} keys: pass labels"
            )
        return torch.arange(n, device=device)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per query), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the query's device ({device}), got {labels.device}")
    if _checks.checking_values():
        lo, hi = torch.aminmax(labels)
        if int(lo) < 0 or int(hi) >= m:
            raise ValueError(f"labels must index keys, in [0, {m}); got values in [{int(lo)}, {int(hi)}]")
    return labels


def _as_f32(v: Optional[Tensor]):
    return v.float().reshape(()) if v is not None else 0.0


def _smoothed(lse: Tensor, pos: Tensor, mean_logit, eps: float) -> Tensor:
    """Cross-entropy with label smoothing ε: lse − (1 − ε)·Z_pos − ε·mean(Z); mean_logit() gives
    mean_j Z_ij (N,), formed only when ε > 0."""
    return lse - pos if eps == 0.0 else lse - (1.0 - eps) * pos - eps * mean_logit()
