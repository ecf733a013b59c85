"""Contrastive losses over a torch.distributed process group (design.md §6).

Every rank passes its own features; the loss it returns is its own (open_clip's per-rank loss), a
fused single-device op computes it, and no B × N logits exist on any rank.

strategy="gather" (open_clip's gather_features): the features are all-gathered, with the
  autograd-aware all_gather when gather_with_grad, else the plain one (and, unless local_loss,
  the rank's own slot replaced by its features so they keep their gradient). local_loss: the
  rank's rows against everyone's columns; else the global loss on the gathered batch, on every
  rank. Needs equal local batch sizes (as open_clip's all_gather).
strategy="ring" (mmfast.distributed.ring): the key blocks travel around the ring; the value and
  gradients of open_clip's local_loss=True, gather_with_grad=True mode (the one large runs use);
  any local batch sizes; memory flat in the world size.

Before any communication the ranks compare what they were given (feature size, dtype, device
type, strategy, loss, whether a backward will run): a mismatch raises the same ValueError on every
rank instead of a hang.
"""
from __future__ import annotations

from typing import Optional

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from mmfast import _backends, _checks
from mmfast.contrastive import api
from mmfast.contrastive.op import contrastive_stats
from mmfast.distributed.ring import ring_rows

STRATEGIES = ("gather", "ring")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEVICES = ("cpu", "cuda")
_LOSSES = ("clip", "infonce", "siglip")


def _agree(group, loss: str, strategy: str, q: Tensor, k: Tensor, needs_backward: bool) -> list:
    """All-gathers (D, dtype, device type, strategy, loss, backward, rows of q, rows of k) of every
    rank; raises on every rank if any but the row counts differ. → [(rows of q, rows of k)] per rank."""
    fields = {"feature size D": q.shape[1], "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
              "device type": _DEVICES.index(q.device.type) if q.device.type in _DEVICES else -1,
              "strategy": STRATEGIES.index(strategy), "loss": _LOSSES.index(loss),
              "backward (any input requires grad)": int(needs_backward)}
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([*fields.values(), q.shape[0], k.shape[0]], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = [t.tolist() for t in table]
    names = {"dtype": _DTYPES, "device type": _DEVICES, "strategy": STRATEGIES, "loss": _LOSSES}
    for j, name in enumerate(fields):
        values = [row[j] for row in table]
        if len(set(values)) > 1:
            shown = [str(names[name][v]).replace("torch.", "") if name in names and v >= 0 else v for v in values]
            raise ValueError(f"mmfast.distributed: {name} differs across ranks (by rank: {shown}); every rank must "
                             f"call the same loss with the same strategy on features of the same size, dtype and "
                             f"device type")
    return [(row[-2], row[-1]) for row in table]


def _setup(group, loss, strategy, q, k, scalars):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mmfast.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    _checks.choice("strategy", strategy, STRATEGIES)
    group = group or dist.group.WORLD
    needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, *scalars))
    sizes = _agree(group, loss, strategy, q, k, needs)
    return group, dist.get_rank(group), sizes


def _gather(x: Tensor, group, with_grad: bool, keep_own: bool) -> Tensor:
    """(W·B, D): every rank's x; with_grad: autograd-aware (the backward sums every rank's
    gradient into each owner's), else plain, with this rank's own slot x itself when keep_own."""
    if with_grad:
        return torch.cat(_autograd(dist_fn.all_gather, x, group))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    if keep_own:
        parts[dist.get_rank(group)] = x
    return torch.cat(parts)


def _equal_sizes(sizes: list, strategy_hint: str) -> None:
    if len({s for pair in sizes for s in pair}) > 1:
        raise ValueError(f"strategy='gather' needs equal local batch sizes on every rank (open_clip's all_gather), "
                         f"got {sizes}; {strategy_hint}")


def _sum_over_ranks(x: Tensor, group) -> Tensor:
    """Σ over ranks of x (autograd-aware: each rank's x gets the sum of every rank's gradient)."""
    return _autograd(dist_fn.all_reduce, x, group)


def _autograd(collective, x: Tensor, group):
    """An autograd-aware collective of torch.distributed.nn (torch 2.13 deprecates them in favour of
    a private module; they are what open_clip uses, from torch 2.4 on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return collective(x, group=group)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, logit_bias=None,
              label_smoothing: float = 0.0, strategy: str = "ring", local_loss: bool = True,
              gather_with_grad: bool = True, group=None, backend: Optional[str] = None) -> Tensor:
    """This rank's CLIP loss over the group. image_features, text_features: (B_r, D), this rank's
    pairs. ring: open_clip's ClipLoss(local_loss=True, gather_with_grad=True) loss of this rank
    (its images against every text, its texts against every image, averaged); gather: open_clip's
    four modes by local_loss × gather_with_grad. The bias (open_clip passes none) shifts every
    logit of a row alike: the softmax ignores it, and its gradient is 0."""
    a = _checks.features("image_features", image_features)
    b = _checks.features("text_features", text_features, a, "image_features")
    _checks.nonempty("image_features", a)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"image_features and text_features must have the same rows (pairs), got {a.shape[0]} "
                         f"and {b.shape[0]}")
    scale, bias, eps = api._scale_bias_smoothing(logit_scale, logit_bias, label_smoothing, a.device)
    group, rank, sizes = _setup(group, "clip", strategy, a, b, (scale, bias))
    name = _backends.select(backend, a.device)
    if strategy == "gather":
        _equal_sizes(sizes, "use strategy='ring'")
        all_a = _gather(a, group, gather_with_grad, keep_own=not local_loss)
        all_b = _gather(b, group, gather_with_grad, keep_own=not local_loss)
        if not local_loss:
            return api.clip_loss(all_a, all_b, scale, logit_bias=bias, label_smoothing=eps, backend=name)
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
        loss = (api.infonce_loss(a, all_b, scale, labels=labels, label_smoothing=eps, backend=name)
                + api.infonce_loss(b, all_a, scale, labels=labels, label_smoothing=eps, backend=name)) / 2
        return loss if bias is None else loss + 0 * bias
    if not (local_loss and gather_with_grad):
        raise ValueError("strategy='ring' computes open_clip's local_loss=True, gather_with_grad=True mode; use "
                         "strategy='gather' for the others")
    rows = [m for _, m in sizes]
    row_img = ring_rows(a, b, scale, bias, False, rows, group, name)
    row_txt = ring_rows(b, a, scale, bias, False, rows, group, name)
    s, bf = api._as_f32(scale), api._as_f32(bias)
    a32, b32 = a.float(), b.float()
    pos = s * (a32 * b32).sum(1) + bf
    total = sum(rows)
    mean_b = lambda: _sum_over_ranks(b32.sum(0), group) / total  # noqa: E731  (ε > 0 only)
    mean_a = lambda: _sum_over_ranks(a32.sum(0), group) / total  # noqa: E731
    image_terms = api._smoothed(row_img, pos, lambda: s * (a32 * mean_b()).sum(1) + bf, eps)
    text_terms = api._smoothed(row_txt, pos, lambda: s * (b32 * mean_a()).sum(1) + bf, eps)
    return (0.5 * (image_terms + text_terms)).mean().float()


def infonce_loss(query: Tensor, keys: Tensor, logit_scale, *, labels: Optional[Tensor] = None,
                 label_smoothing: float = 0.0, strategy: str = "ring", group=None,
                 backend: Optional[str] = None) -> Tensor:
    """This rank's one-directional InfoNCE: its queries (B_r, D) against every rank's keys (M_r, D).
    labels: (B_r,) int64 indexes of each query's positive among this rank's own keys (default
    arange(B_r)). Key gradients sum every rank's terms (as an autograd all_gather's)."""
    q = _checks.features("query", query)
    k = _checks.features("keys", keys, q, "query")
    _checks.nonempty("query", q)
    _checks.nonempty("keys", k)
    labels = api._labels(labels, q.shape[0], k.shape[0], q.device)
    scale, _, eps = api._scale_bias_smoothing(logit_scale, None, label_smoothing, q.device)
    group, rank, sizes = _setup(group, "infonce", strategy, q, k, (scale,))
    name = _backends.select(backend, q.device)
    rows = [m for _, m in sizes]
    offset = sum(rows[:rank])
    if strategy == "gather":
        _equal_sizes([(m,) for m in rows], "use strategy='ring'")
        return api.infonce_loss(q, _gather(k, group, True, False), scale, labels=labels + offset,
                                label_smoothing=eps, backend=name)
    row = ring_rows(q, k, scale, None, False, rows, group, name)
    s = api._as_f32(scale)
    q32, k32 = q.float(), k.float()
    pos = s * (q32 * k32[labels]).sum(1)
    mean_k = lambda: _sum_over_ranks(k32.sum(0), group) / sum(rows)  # noqa: E731
    return api._smoothed(row, pos, lambda: s * (q32 * mean_k()).sum(1), eps).mean().float()


# open_clip's SigLipLoss dist_impl values and the strategy that computes each (all have one value).
SIGLIP_IMPLS = {"bidir": "ring", "shift": "ring", "ring": "ring", "reduce": "gather", "gather": "gather"}


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                dist_impl: str = "ring", group=None, backend: Optional[str] = None) -> Tensor:
    """This rank's SigLIP loss, open_clip's SigLipLoss with world_size > 1: its images (B_r, D)
    against every rank's texts (M_r, D), positives on the diagonal of its own block, divided by
    B_r. dist_impl: open_clip's "bidir", "shift", "reduce", "gather" (one value and gradient
    between them: the first two run as the ring, the others as the all-gather) or "ring"."""
    a = _checks.features("image_features", image_features)
    b = _checks.features("text_features", text_features, a, "image_features")
    _checks.nonempty("image_features", a)
    if b.shape[0] < a.shape[0]:
        raise ValueError(f"text_features needs at least as many rows as image_features (positives on the "
                         f"diagonal), got {b.shape[0]} < {a.shape[0]}")
    _checks.choice("dist_impl", dist_impl, tuple(SIGLIP_IMPLS))
    strategy = SIGLIP_IMPLS[dist_impl]
    scale, bias, _ = api._scale_bias_smoothing(logit_scale, logit_bias, 0.0, a.device)
    group, rank, sizes = _setup(group, "siglip", strategy, a, b, (scale, bias))
    name = _backends.select(backend, a.device)
    rows = [m for _, m in sizes]
    positives = torch.arange(a.shape[0], device=a.device)
    if strategy == "gather":
        _equal_sizes([(m,) for m in rows], "use dist_impl='ring'")
        all_b = _gather(b, group, True, False)
        row, _ = contrastive_stats(a, all_b, scale, bias, positives + sum(rows[:rank]), True, False, name)
    else:
        row = ring_rows(a, b, scale, bias, True, rows, group, name, positives)
    return (row.sum() / a.shape[0]).float()
