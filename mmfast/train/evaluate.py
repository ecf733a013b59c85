"""Evaluation of a CLIPModel (with or without its fusion encoder) during and after training, through
mmfast.eval: retrieval both ways, zero-shot classification, masked-word accuracy with the image and
with a blank one. Every metric has its chance level (chance()), so a reader can judge it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mmfast.data import IGNORE_INDEX, Tokenizer
from mmfast.eval import retrieval_metrics, zero_shot_accuracy, zero_shot_classifier

# Retrieval cut-offs reported (R@k both ways).
KS = (1, 5, 10)
# Evaluation batch: forward passes only, so larger than a training batch.
EVAL_BATCH = 500


@dataclass
class EvalSet:
    """pairs: (image, caption) items, one caption per image (retrieval, masked words).
    zero_shot: (image, _) items with `labels` (N,) indexing classnames (and optionally `held_out`
    (N,) bool, the images whose class training never showed, scored apart too), or None; a
    class's embedding averages its prompts template.format(classname). word_groups: the kinds of maskable
    words (the colours, the shapes, ...): a masked word's chance is one over its kind's size."""
    pairs: object
    zero_shot: object = None
    classnames: Sequence[str] = ()
    templates: Sequence[str] = ()
    word_groups: Sequence[Sequence[str]] = ()


def _chunks(dataset):
    for start in range(0, len(dataset), EVAL_BATCH):
        items = [dataset[i] for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
        yield torch.stack([image for image, _ in items]), [caption for _, caption in items]


def _masked(dataset, tokenizer: Tokenizer, max_len: int, seed: int = 0):
    """(images, masked ids, labels, mask) per chunk: one maskable word per caption → [MASK], the
    same positions on every call."""
    generator = torch.Generator().manual_seed(seed)
    for images, captions in _chunks(dataset):
        ids, mask = tokenizer.encode(captions, max_len)
        masked, labels = tokenizer.mask_one(ids, mask, generator)
        yield images, masked, labels, mask


@torch.no_grad()
def embed(model, dataset, tokenizer: Tokenizer, device, autocast=contextlib.nullcontext,
          texts: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(image features (N, E), text features (N, E) or None), fp32, L2-normalised, of every item."""
    img, txt = [], []
    for images, captions in _chunks(dataset):
        with autocast():
            img.append(model.encode_image(images.to(device)).float())
            if texts:
                ids, mask = tokenizer.encode(captions, model.config.text.max_len)
                txt.append(model.encode_text(ids.to(device), mask.to(device)).float())
    return torch.cat(img), (torch.cat(txt) if texts else None)


@torch.no_grad()
def masked_word_accuracy(model, dataset, tokenizer: Tokenizer, device, autocast=contextlib.nullcontext,
                         blank: bool = False) -> float:
    """Fraction of masked words the fusion encoder recovers (argmax over the vocabulary). blank: the
    images replaced by a uniform grey one, so only the caption's other words can help."""
    right = total = 0
    for images, masked, labels, mask in _masked(dataset, tokenizer, model.config.text.max_len):
        if blank:
            images = torch.full_like(images, 0.5)
        masked, labels, mask = masked.to(device), labels.to(device), mask.to(device)
        with autocast():
            _, patches = model.visual(images.to(device))
            _, hidden = model.text(masked, mask)
            logits = model.fusion.logits(hidden, patches, mask)
        at = labels != IGNORE_INDEX
        right += int((logits[at].argmax(-1) == labels[at]).sum())
        total += int(at.sum())
    return right / max(total, 1)


def evaluate(model, tokenizer: Tokenizer, data: EvalSet, *, device=None,
             autocast: Callable = contextlib.nullcontext, backend: Optional[str] = None) -> dict:
    """{metric: value}: image↔text R@k, zero-shot top-1 (if data.zero_shot), masked-word accuracy
    with the image and with a blank one (if the model has a fusion encoder); fractions in [0, 1]."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        img, txt = embed(model, data.pairs, tokenizer, device, autocast)
        owner = torch.arange(len(data.pairs), device=img.device)
        out = {k: v for k, v in retrieval_metrics(img, txt, owner, ks=KS, backend=backend).items() if "_R@" in k}
        if data.zero_shot is not None:
            def encode(prompts):
                ids, mask = tokenizer.encode(prompts, model.config.text.max_len)
                with torch.no_grad(), autocast():
                    return model.encode_text(ids.to(device), mask.to(device)).float()

            classifier = zero_shot_classifier(encode, data.classnames, data.templates)
            images, _ = embed(model, data.zero_shot, tokenizer, device, autocast, texts=False)
            labels = data.zero_shot.labels.to(images.device)
            top1 = lambda rows: zero_shot_accuracy(images[rows], labels[rows], classifier, ks=(1,),  # noqa: E731
                                                   backend=backend)["top1_accuracy"]
            out["zero_shot_top1"] = top1(slice(None))
            held_out = getattr(data.zero_shot, "held_out", None)
            if held_out is not None and held_out.any():
                out["zero_shot_top1_held_out"] = top1(held_out.to(images.device))
        if getattr(model, "fusion", None) is not None:
            for key, blank in (("mlm_accuracy", False), ("mlm_accuracy_blank_image", True)):
                out[key] = masked_word_accuracy(model, data.pairs, tokenizer, device, autocast, blank)
    finally:
        model.train(was_training)
    return out


def chance(tokenizer: Tokenizer, data: EvalSet, max_len: int, mlm: bool = True) -> dict:
    """The chance level of each metric evaluate() reports: R@k = k / N among N candidates, zero-shot
    top-1 = 1 / classes, a masked word: one over the size of its kind (data.word_groups), or over
    every maskable word, on the positions masked_word_accuracy masks."""
    n = len(data.pairs)
    out = {f"{d}_R@{k}": min(k, n) / n for d in ("image_to_text", "text_to_image") for k in KS}
    if data.zero_shot is not None:
        out["zero_shot_top1"] = out["zero_shot_top1_held_out"] = 1 / len(data.classnames)
    if mlm:
        kind = {tokenizer.ids[w]: len(words) for words in data.word_groups for w in words}
        odds = [1 / kind.get(int(t), len(tokenizer.maskable))
                for *_, labels, _ in _masked(data.pairs, tokenizer, max_len) for t in labels[labels != IGNORE_INDEX]]
        out["mlm_accuracy"] = out["mlm_accuracy_blank_image"] = sum(odds) / max(len(odds), 1)
    return out
