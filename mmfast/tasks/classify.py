"""Classification fine-tuning: a head on the image (or fused) features of a pretrained CLIPModel,
cross-entropy through mmfast.cross_entropy, full fine-tuning or a frozen backbone (linear probe),
optionally few-shot; reported beside the zero-shot accuracy of the same checkpoint.

The classes are the 18 `shapes` (colour, shape) pairs and six of them never occur in training. A
plain linear head only ever sees those six as wrong answers, so it learns never to name them. The
default `factored` head scores a class as its colour's logit plus its shape's logit, and trains each
attribute's softmax over the values that training shows with the other attribute's value (a red
image: circle or square). Within those, the other attribute is constant, so the head has no reason
to learn "red never comes as a triangle": it must read the shape from the image, and a held-out
pair is named from its parts. The `prompts` head (the text tower's class embeddings, as zero-shot
classification forms them, trained through the tower: an open-vocabulary head) trains over the
classes training holds; `linear` is the plain head, over all 18.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.cross_entropy import cross_entropy
from mmfast.data import COLORS, SHAPES, TEMPLATES, Shapes
from mmfast.tasks.base import EVAL_BATCH, Task, ZeroShot, eval_mode
from mmfast.train.data import zero_shot_images

HEADS = ("factored", "prompts", "linear")
FEATURES = ("image", "patches", "fused")


class ClassHead(nn.Module):
    """features (B, F) → class logits (B, 18), after a LayerNorm. factored: logit[c] = colour_logit[c // 3] +
    shape_logit[c % 3]; linear: one row per class."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(width)  # features of any scale (a tower's pooled output) at unit variance
        if kind == "factored":
            self.colour, self.shape = nn.Linear(width, len(COLORS)), nn.Linear(width, len(SHAPES))
        else:
            self.classes = nn.Linear(width, len(COLORS) * len(SHAPES))

    def forward(self, features: Tensor) -> Tensor:
        if self.kind == "linear":
            return self.classes(self.norm(features))
        colour, shape = self.parts(features)
        return (colour[:, :, None] + shape[:, None, :]).flatten(1)

    def parts(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """factored: (colour logits (B, 6), shape logits (B, 3))."""
        features = self.norm(features)
        return self.colour(features), self.shape(features)


class Labeled(torch.utils.data.Dataset):
    """(image (C, H, W) float in [0, 1], label) items of the given rows of a Shapes set, cycled to at
    least `length` items (a few-shot set smaller than a batch repeats within the batch)."""

    def __init__(self, shapes: Shapes, rows: Tensor, length: int = 0):
        self.shapes, self.rows = shapes, rows
        self.length = max(len(rows), length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        row = int(self.rows[i % len(self.rows)])
        return self.shapes.images[row].float() / 255, int(self.shapes.labels[row])


class Classify(Task):
    """Options: head ("factored", "prompts" or "linear", above); features: "image" (the image tower's
    pooled feature), "patches" (the mean of its patch tokens) or "fused" (the fusion encoder's
    [CLS] state over the patches, for a checkpoint pretrained with mlm); freeze_backbone (a linear probe: only the head trains); shots: k training
    images per class (0: all); label_smoothing."""
    name = "classify"
    headline = "classify_top1_held_out"
    defaults = {"head": "factored", "features": "image", "freeze_backbone": False, "shots": 0,
                "label_smoothing": 0.0}
    # 120 steps: full fine-tuning names held-out pairs best early on; later the backbone specialises
    # to the seen pairs and held-out accuracy falls (measured from the demo's checkpoint, lr 5e-4:
    # 43–63 % at 120 steps over two seeds, 13 % at 724 steps)
    recipe = {"batch_size": 128, "lr": 5e-4, "warmup_steps": 10, "steps": 120}

    def __init__(self, model, tokenizer, config, device, autocast=None, options=None):
        super().__init__(model, tokenizer, config, device, autocast, options)
        o = self.options
        if o["head"] not in HEADS:
            raise ValueError(f"task_options['head'] must be one of {HEADS}, got {o['head']!r}")
        if o["features"] not in FEATURES:
            raise ValueError(f"task_options['features'] must be one of {FEATURES}, got {o['features']!r}")
        if o["features"] == "fused" and getattr(model, "fusion", None) is None:
            raise ValueError("task_options['features'] = 'fused' needs a checkpoint with a fusion encoder "
                             "(pretrained with mlm)")
        if o["shots"] < 0:
            raise ValueError(f"task_options['shots'] must be >= 0, got {o['shots']}")
        if not 0 <= o["label_smoothing"] < 1:
            raise ValueError(f"task_options['label_smoothing'] must be in [0, 1), got {o['label_smoothing']}")
        if o["freeze_backbone"] and o["head"] == "prompts":
            raise ValueError("task_options: head 'prompts' is the text tower itself: freeze_backbone would leave "
                             "nothing to train (use head 'factored' or 'linear' for a linear probe)")
        self.frozen_backbone = o["freeze_backbone"]
        width = {"image": model.config.image.embed_dim, "patches": model.config.image.width,
                 "fused": model.config.text.width}[o["features"]]
        self.head = ClassHead(width, o["head"]) if o["head"] != "prompts" else None
        self.seen = torch.zeros(len(COLORS), len(SHAPES), dtype=torch.bool)  # the (colour, shape) pairs train_data holds
        prompts = [t.format(name) for name in Shapes.classnames() for t in TEMPLATES]
        self.class_prompts = tokenizer.encode(prompts, model.config.text.max_len)
        self.eval_images = zero_shot_images(config.eval_size, config.seed, self.image_size(model))
        # the [CLS] token the fused features read (a caption with no words: the image alone)
        self.prompt = tokenizer.encode([""], model.config.text.max_len)

    def train_data(self) -> Labeled:
        c = self.config
        shapes = Shapes("train", c.train_size, seed=c.seed, image_size=self.eval_images.images.shape[-1], max_shapes=1)
        rows = torch.arange(len(shapes))
        if self.options["shots"]:  # the first k images of each class
            rows = torch.cat([torch.nonzero(shapes.labels == k)[: self.options["shots"], 0]
                              for k in shapes.labels.unique()])
        self.seen.view(-1)[shapes.labels[rows].unique()] = True
        return Labeled(shapes, rows, length=c.batch_size)

    def collate(self, items: list) -> dict:
        return {"images": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}

    def features(self, model, images: Tensor) -> Tensor:
        """images (B, C, H, W) → (B, F): the image feature, or the fused [CLS] state (no graph with a
        frozen backbone)."""
        with torch.no_grad() if self.frozen_backbone else contextlib.nullcontext():
            return self._features(model, images)

    def _features(self, model, images: Tensor) -> Tensor:
        pooled, patches = model.visual(images)
        if self.options["features"] == "image":
            return pooled
        if self.options["features"] == "patches":
            return patches.mean(1)
        ids, mask = (t.to(images.device).expand(len(images), -1) for t in self.prompt)
        _, hidden = model.text(ids, mask)
        return model.fusion.hidden(hidden, patches, mask)[:, 0]

    def prompt_classes(self, model) -> Tensor:
        """(18, E) class embeddings from the text tower, as the zero-shot classifier forms them (each
        class: its prompts' normalised embeddings averaged, normalised), with a graph."""
        ids, mask = (t.to(self.device) for t in self.class_prompts)
        emb = F.normalize(model.text(ids, mask)[0], dim=-1).view(len(Shapes.classnames()), len(TEMPLATES), -1)
        return F.normalize(emb.mean(1), dim=-1)

    def logits(self, model, images: Tensor) -> Tensor:
        if self.options["head"] == "prompts":
            img = F.normalize(model.visual(images)[0], dim=-1)
            return model.logit_scale.exp() * img @ self.prompt_classes(model).T
        return self.head(self.features(model, images))

    def losses(self, model, batch: dict) -> dict:
        images, labels = batch["images"], batch["labels"]
        eps, seen = self.options["label_smoothing"], self.seen.to(labels.device)
        if self.options["head"] == "factored":
            colour, shape = (x.float() for x in self.head.parts(self.features(model, images)))
            c, s = labels // len(SHAPES), labels % len(SHAPES)
            # each attribute's softmax over the values training shows with the other attribute's value
            return {"colour": restricted_cross_entropy(colour, seen[:, s].T, c, eps),
                    "shape": restricted_cross_entropy(shape, seen[c], s, eps)}
        logits = self.logits(model, images).float()
        if self.options["head"] == "prompts":  # the softmax over the classes training has
            return {"ce": restricted_cross_entropy(logits, seen.flatten().expand_as(logits), labels, eps)}
        return {"ce": cross_entropy(logits, labels, label_smoothing=eps)}

    def _accuracy(self, predict) -> dict:
        """predict(images) → classes; top-1 over all evaluation images and over the held-out ones."""
        data = self.eval_images
        pred = torch.cat([predict(data.images[i:i + EVAL_BATCH].float() / 255)
                          for i in range(0, len(data.labels), EVAL_BATCH)])
        right = pred.cpu() == data.labels
        return {"classify_top1": float(right.double().mean()),
                "classify_top1_held_out": float(right[data.held_out].double().mean())}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        def predict(images):
            with self.autocast():
                return self.logits(model, images.to(self.device)).argmax(-1)

        with eval_mode(model), eval_mode(self):
            return self._accuracy(predict)

    def baseline(self, model) -> dict:
        """The zero-shot accuracy of the same model on the same images, under the same keys."""
        return self._accuracy(ZeroShot(model, self.tokenizer, self.device, self.autocast).predict)

    def chance(self) -> dict:
        return {"classify_top1": 1 / len(Shapes.classnames()), "classify_top1_held_out": 1 / len(Shapes.classnames())}


def restricted_cross_entropy(logits: Tensor, allowed: Tensor, labels: Tensor, eps: float) -> Tensor:
    """Mean cross-entropy of logits (B, K) over each row's allowed classes (B, K) bool (the label's
    among them), label smoothing ε spread over the allowed ones: per row
    lse − (1 − ε)·x_y − ε·mean_allowed(x) = CE + ε·(x_y − mean_allowed(x)), CE through
    mmfast.cross_entropy with the others at −inf (so they take no probability and no gradient)."""
    ce = cross_entropy(logits.masked_fill(~allowed, float("-inf")), labels, reduction="none")
    if eps:
        mean = logits.masked_fill(~allowed, 0).sum(1) / allowed.sum(1)
        ce = ce + eps * (logits.gather(1, labels[:, None])[:, 0] - mean)
    return ce.mean()
