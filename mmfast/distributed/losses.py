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
# An agreed call's fields, as int64 (label smoothing in units of 1e-9); their names in errors.
_FIELDS = ("input error", "loss", "feature size D", "dtype", "device type", "backward (any input requires grad)",
           "strategy", "label_smoothing", "local_loss", "gather_with_grad", "backend")
_NAMES = {"loss": _LOSSES, "dtype": _DTYPES, "device type": _DEVICES, "strategy": STRATEGIES,
          "backend": _backends.BACKENDS}


def _agreed(group, loss: str, validate) -> tuple:
    """Runs validate(group) → dict(q, k, scalars, strategy, eps, local_loss, gather_with_grad,
    backend, …) on this rank, then all-gathers every rank's fields (or its input error) before any
    other communication: a rank's bad input, or a difference between ranks in anything but the
    batch sizes, raises on every rank instead of leaving the others waiting.
    → (the dict, the group, this rank, [(rows of q, rows of k)] by rank)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mmfast.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    group = group or dist.group.WORLD
    try:
        v, error = validate(group), None
    except (TypeError, ValueError, RuntimeError) as exc:
        v, error = None, exc
    if v is None:
        mine = [1] + [-1] * (len(_FIELDS) + 1)
    else:
        q, k = v["q"], v["k"]
        needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, *v["scalars"]))
        mine = [0, _LOSSES.index(loss), q.shape[1], _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
                _DEVICES.index(q.device.type) if q.device.type in _DEVICES else -1, int(needs),
                STRATEGIES.index(v["strategy"]), round(v["eps"] * 1e9), int(v["local_loss"]),
                int(v["gather_with_grad"]), _backends.BACKENDS.index(v["backend"]), q.shape[0], k.shape[0]]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(mine, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = [t.tolist() for t in table]
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"mmfast.distributed: rank(s) {failed} rejected their inputs (their own error says why); "
                         f"no rank went on")
    for j, name in enumerate(_FIELDS[1:], 1):
        values = [row[j] for row in table]
        if len(set(values)) > 1:
            shown = [str(_NAMES[name][x]).replace("torch.", "") if name in _NAMES and x >= 0 else x for x in values]
            raise ValueError(f"mmfast.distributed: {name} differs across ranks (by rank: {shown}); every rank must "
                             f"make the same call on features of the same size, dtype and device type")
    return v, group, dist.get_rank(group), [(row[-2], row[-1]) for row in table]


def _backend(backend: Optional[str], device: torch.device) -> str:
    """The rank's backend; "reference" runs as "torch": the ring needs the two primitives."""
    name = _backends.select(backend, device)
    return "torch" if name == "reference" else name


def _strategy(strategy: str, group) -> str:
    _checks.choice("strategy", strategy, STRATEGIES)
    if strategy == "gather" and group is not dist.group.WORLD:
        raise ValueError("strategy='gather' runs on the default (world) group only: the backward of "
                         "torch.distributed.nn's all_gather maps group ranks as global ones; use strategy='ring'")
    return strategy


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
    def validate(group):
        a = _checks.features("image_features", image_features)
        b = _checks.features("text_features", text_features, a, "image_features")
        _checks.nonempty("image_features", a)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"image_features and text_features must have the same rows (pairs), got {a.shape[0]} "
                             f"and {b.shape[0]}")
        scale, bias, eps = api._scale_bias_smoothing(logit_scale, logit_bias, label_smoothing, a.device)
        if _strategy(strategy, group) == "ring" and not (local_loss and gather_with_grad):
            raise ValueError("strategy='ring' computes open_clip's local_loss=True, gather_with_grad=True mode; use "
                             "strategy='gather' for the others")
        return dict(q=a, k=b, scalars=(scale, bias), scale=scale, bias=bias, eps=eps, strategy=strategy,
                    local_loss=local_loss, gather_with_grad=gather_with_grad, backend=_backend(backend, a.device))

    v, group, rank, sizes = _agreed(group, "clip", validate)
    a, b, scale, bias, eps, name = v["q"], v["k"], v["scale"], v["bias"], v["eps"], v["backend"]
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
    def validate(group):
        q = _checks.features("query", query)
        k = _checks.features("keys", keys, q, "query")
        _checks.nonempty("query", q)
        _checks.nonempty("keys", k)
        scale, _, eps = api._scale_bias_smoothing(logit_scale, None, label_smoothing, q.device)
        return dict(q=q, k=k, scalars=(scale,), scale=scale, eps=eps, strategy=_strategy(strategy, group),
                    labels=api._labels(labels, q.shape[0], k.shape[0], q.device), local_loss=True,
                    gather_with_grad=True, backend=_backend(backend, q.device))

    v, group, rank, sizes = _agreed(group, "infonce", validate)
    q, k, scale, eps, labels, name = v["q"], v["k"], v["scale"], v["eps"], v["labels"], v["backend"]
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
    def validate(group):
        a = _checks.features("image_features", image_features)
        b = _checks.features("text_features", text_features, a, "image_features")
        _checks.nonempty("image_features", a)
        if b.shape[0] < a.shape[0]:
            raise ValueError(f"text_features needs at least as many rows as image_features (positives on the "
                             f"diagonal), got {b.shape[0]} < {a.shape[0]}")
        _checks.choice("dist_impl", dist_impl, tuple(SIGLIP_IMPLS))
        scale, bias, _ = api._scale_bias_smoothing(logit_scale, logit_bias, 0.0, a.device)
        return dict(q=a, k=b, scalars=(scale, bias), scale=scale, bias=bias, eps=0.0,
                    strategy=_strategy(SIGLIP_IMPLS[dist_impl], group), local_loss=True, gather_with_grad=True,
                    backend=_backend(backend, a.device))

    v, group, rank, sizes = _agreed(group, "siglip", validate)
    a, b, scale, bias, name, strategy = v["q"], v["k"], v["scale"], v["bias"], v["backend"], v["strategy"]
    rows = [m for _, m in sizes]
    positives = torch.arange(a.shape[0], device=a.device)
    if strategy == "gather":
        _equal_sizes([(m,) for m in rows], "use dist_impl='ring'")
        all_b = _gather(b, group, True, False)
        row, _ = contrastive_stats(a, all_b, scale, bias, positives + sum(rows[:rank]), True, False, name)
    else:
        row = ring_rows(a, b, scale, bias, True, rows, group, name, positives)
    return (row.sum() / a.shape[0]).float()
