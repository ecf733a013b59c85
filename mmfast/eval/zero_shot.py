"""Zero-shot classification (ImageNet-style): class embeddings from prompt templates, then top-k
accuracy and mean per-class recall through the streaming top-k."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.eval import _common
from mmfast.similarity.api import topk_similarity

Template = Union[str, Callable[[str], str]]


def zero_shot_classifier(text_encoder: Callable[[list], Tensor], classnames: Sequence[str],
                         templates: Sequence[Template]) -> Tensor:
    """(C, D) fp32 class embeddings: for each class, its prompts (template.format(name), or
    template(name) for a callable, as open_clip's) are encoded, each embedding L2-normalised, the
    mean taken and normalised again. text_encoder(list of T strings) → (T, D) tensor (or array)."""
    if isinstance(classnames, str) or not classnames:
        raise ValueError("classnames must be a non-empty sequence of class names")
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty sequence of format strings (with '{}') or callables")
    rows = []
    with torch.no_grad():
        for name in classnames:
            prompts = [t(name) if callable(t) else t.format(name) for t in templates]
            emb = torch.as_tensor(text_encoder(prompts))
            if emb.dim() != 2 or emb.shape[0] != len(prompts) or not emb.is_floating_point():
                raise ValueError(f"text_encoder must return a float (n, D) array for n = {len(prompts)} prompts, "
                                 f"got {emb.dtype} of shape {tuple(emb.shape)}")
            mean = F.normalize(emb.float(), dim=1).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def zero_shot_accuracy(image_emb: Tensor, labels: Tensor, classifier: Tensor, *, ks: Sequence[int] = (1, 5),
                       backend: Optional[str] = None) -> dict:
    """image_emb: (N, D), labels: (N,) integers in [0, C), classifier: (C, D) (zero_shot_classifier's).
    An image's classes are ranked by image·class (a positive rescaling of the image does not change
    its ranking; equal scores: lower class index first, as topk_similarity). Returns a dict of
    Python floats:

      top{k}_accuracy          fraction of images whose label is among their k best classes
                               (k > C counts as k = C)
      mean_per_class_recall    top-1 recall of each class present in labels, averaged over them
    """
    img = _common.embeddings("image_emb", image_emb)
    cls = _common.embeddings("classifier", classifier, img, "image_emb")
    labels = _common.index_vector("labels", labels, img.shape[0], cls.shape[0], img.device, "image")
    ks = _common.ks_arg(ks)
    _, idx = topk_similarity(img, cls, min(max(ks), cls.shape[0]), backend=backend)
    hit = idx == labels[:, None]
    out = {f"top{k}_accuracy": float(hit[:, :k].any(1).double().mean()) for k in ks}
    per_class = torch.bincount(labels, minlength=cls.shape[0]).double()
    correct = torch.bincount(labels[hit[:, 0]], minlength=cls.shape[0]).double()
    present = per_class > 0
    out["mean_per_class_recall"] = float((correct[present] / per_class[present]).mean())
    return out
