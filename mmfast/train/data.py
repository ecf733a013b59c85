"""What the training loop eats: a Batch of images, captions' tokens and the masked-LM inputs, drawn
in an order that is a function of (seed, step) alone, so a resumed run sees the batches that an
uninterrupted one would have."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from mmfast.data import IGNORE_INDEX, CaptionFiles, Shapes, Tokenizer


@dataclass
class Batch:
    """images: (B, C, H, W) float; ids, mask: (B, S) the clean captions (contrastive); mlm_ids,
    mlm_labels: (B, S) the masked captions and their labels (−100 where not masked), or None."""
    images: Tensor
    ids: Tensor
    mask: Tensor
    mlm_ids: Optional[Tensor] = None
    mlm_labels: Optional[Tensor] = None

    def _map(self, fn) -> list:
        return [None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)]

    def to(self, device) -> "Batch":
        return Batch(*self._map(lambda t: t.to(device, non_blocking=True)))

    def split(self, parts: int) -> list["Batch"]:
        """parts micro-batches of equal size (B must be a multiple of parts)."""
        cols = self._map(lambda t: t.chunk(parts))
        return [Batch(*(None if c is None else c[j] for c in cols)) for j in range(parts)]

    @property
    def masked_tokens(self) -> int:
        return 0 if self.mlm_labels is None else int((self.mlm_labels != IGNORE_INDEX).sum())


def build_batch(images: Tensor, captions: list, tokenizer: Tokenizer, max_len: int, mlm_prob: Optional[float],
                generator: Optional[torch.Generator]) -> Batch:
    ids, mask = tokenizer.encode(captions, max_len)
    batch = Batch(images, ids, mask)
    if mlm_prob is not None:
        batch.mlm_ids, batch.mlm_labels = tokenizer.mask_tokens(ids, mask, generator, mlm_prob)
    return batch


def seed_of(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for (seed, purpose, index): distinct seeds never share a stream at shifted indices."""
    words = np.random.SeedSequence([seed, index, *purpose.encode()]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class StepOrder(torch.utils.data.Sampler):
    """Index lists for steps start..stop-1: each epoch is a permutation drawn from (seed, epoch);
    step s takes the (s mod E)-th slice of world · batch_size of epoch s div E (E = full global
    batches per epoch), and this rank the rank-th batch_size of it."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        if size < batch_size * world:
            raise ValueError(f"batch_size ({batch_size}) × ranks ({world}) is larger than the training set "
                             f"({size} pairs)")
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self.per_epoch = size // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list]:
        epoch, order = None, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                generator = torch.Generator().manual_seed(seed_of(self.seed, "order", epoch))
                order = torch.randperm(self.size, generator=generator)
            i = ((step % self.per_epoch) * self.world + self.rank) * self.batch_size
            yield order[i: i + self.batch_size].tolist()


def collate(items: list) -> tuple[Tensor, list]:
    """[(image (C, H, W), caption)] → (images (B, C, H, W), captions)."""
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def loader(dataset, order: StepOrder, workers: int, collate_fn=collate) -> torch.utils.data.DataLoader:
    # Its own generator (it seeds the workers): drawing from the global RNG would shift the dropout
    # masks of a resumed run against an uninterrupted one.
    generator = torch.Generator().manual_seed(seed_of(order.seed, "workers", order.start))
    return torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate_fn, num_workers=workers,
                                       generator=generator)


class LabeledImages(torch.utils.data.Dataset):
    """Zero-shot images: (image (C, H, W) float in [0, 1], "") items; labels (N,) class indices;
    held_out (N,) bool: the image's class is a combination training never shows."""

    def __init__(self, parts: list, held_out: list):
        self.images = torch.cat([p.images for p in parts])
        self.labels = torch.cat([p.labels for p in parts])
        self.held_out = torch.cat([torch.full((len(p),), h) for p, h in zip(parts, held_out)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].float() / 255, ""


def distinct_captions(pairs) -> torch.utils.data.Subset:
    """The pairs whose caption no earlier pair has: retrieval scores one image per caption, so a
    caption shared by several images would make the others count as misses."""
    first = {}
    for i, caption in enumerate(pairs.captions):
        first.setdefault(caption, i)
    return torch.utils.data.Subset(pairs, sorted(first.values()))


def datasets(data: str, eval_data: Optional[str], train_size: int, eval_size: int, image_size: int, seed: int):
    """(train pairs, eval pairs or None, zero-shot images or None) from the config's data fields;
    the eval pairs keep one pair per distinct caption (distinct_captions).
    shapes: the train split; the test split's pairs (each image holds a held-out combination); and
    the zero-shot images (zero_shot_images)."""
    if data == "shapes":
        pairs = distinct_captions(Shapes("test", eval_size, seed=seed, image_size=image_size))
        return (Shapes("train", train_size, seed=seed, image_size=image_size), pairs,
                zero_shot_images(eval_size, seed, image_size))
    train = CaptionFiles(data, image_size=image_size)
    return train, (distinct_captions(CaptionFiles(eval_data, image_size=image_size)) if eval_data else None), None


def zero_shot_images(size: int, seed: int, image_size: int) -> LabeledImages:
    """`size` single-object images of all 18 classes, a third of them held-out combinations, two
    thirds seen ones (fresh draws), so that an image-blind classifier scores 1/18."""
    held = Shapes("test", size // 3, seed=seed + 1, image_size=image_size, max_shapes=1)
    seen = Shapes("train", size - size // 3, seed=seed + 1, image_size=image_size, max_shapes=1)
    return LabeledImages([held, seen], [True, False])


def tokenizer_for(data: str, train) -> Tokenizer:
    """shapes: its fixed vocabulary, masking the attribute words; files: the words of the captions."""
    if data == "shapes":
        return Tokenizer(Shapes.vocabulary(), maskable=Shapes.attribute_words())
    return Tokenizer.from_texts(train.captions)
