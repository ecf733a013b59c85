"""Visual questions about the `shapes` images, generated from the objects each image holds.

    colour     "what colour is the {shape} ?"           → "red"       (that shape occurs once)
    shape      "what shape is the {colour} object ?"    → "circle"    (that colour occurs once)
    count      "how many shapes are there ?"            → "two"
    relation   "is the {shape} left of the {shape} ?"   → "yes"/"no"  (two objects of different shapes)
    describe   "what is the {size} object ?"            → "red circle" (that size occurs once)

    questions = Questions(Shapes("train", 1000), seed=0)
    image, question, answer, kind = questions[0]
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from mmfast.data.shapes import COLORS, QUESTION_WORDS, SHAPES, SIZES, Obj, Shapes, relation

TYPES = ("colour", "shape", "count", "relation", "describe")
# A false relation is the opposite one: on the other axis a "no" could be arguable.
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("one", "two", "three")
# Every answer a question type can have.
ANSWERS = {"colour": list(COLORS), "shape": list(SHAPES), "count": list(NUMBERS), "relation": ["yes", "no"],
           "describe": [f"{c} {s}" for c in COLORS for s in SHAPES]}


def words() -> list[str]:
    """Every word a question or an answer can contain."""
    return list(dict.fromkeys([*QUESTION_WORDS, *COLORS, *SHAPES, *SIZES, "left", "right", "of", "above", "below"]))


def _once(values) -> list:
    """The values occurring exactly once, in first-seen order."""
    counts = Counter(values)
    return [v for v in counts if counts[v] == 1]


def _pick(values: list, rng: np.random.Generator):
    return values[rng.integers(len(values))]


def applicable(objs: tuple[Obj, ...]) -> list[str]:
    """The question types that have an unambiguous answer for these objects, in TYPES order."""
    ok = {"colour": bool(_once(o.shape for o in objs)), "shape": bool(_once(o.color for o in objs)),
          "count": True, "relation": len(objs) == 2 and objs[0].shape != objs[1].shape,
          "describe": bool(_once(o.size for o in objs))}
    return [t for t in TYPES if ok[t]]


def ask(kind: str, objs: tuple[Obj, ...], rng: np.random.Generator) -> tuple[str, str]:
    """One question of type `kind` (applicable to objs) and its answer; rng picks what is asked about."""
    if kind == "colour":
        shape = _pick(_once(o.shape for o in objs), rng)
        return f"what colour is the {shape} ?", next(o.color for o in objs if o.shape == shape)
    if kind == "shape":
        color = _pick(_once(o.color for o in objs), rng)
        return f"what shape is the {color} object ?", next(o.shape for o in objs if o.color == color)
    if kind == "count":
        return "how many shapes are there ?", NUMBERS[len(objs) - 1]
    if kind == "relation":
        a, b = objs if rng.random() < 0.5 else objs[::-1]
        true = relation(a, b)
        asked = true if rng.random() < 0.5 else OPPOSITE[true]
        return f"is the {a.shape} {asked} the {b.shape} ?", "yes" if asked == true else "no"
    if kind == "describe":
        size = _pick(_once(o.size for o in objs), rng)
        obj = next(o for o in objs if o.size == size)
        return f"what is the {size} object ?", f"{obj.color} {obj.shape}"
    raise ValueError(f"unknown question type {kind!r}; choose from {TYPES}")


class Questions(torch.utils.data.Dataset):
    """`per_image` questions of distinct types about each image of `shapes`, identical for the same
    arguments. Each image gets, among its applicable types, those asked least so far (ties broken
    at random), which keeps the mix as balanced as the images allow (relation applies to ~1 in 5).

    Attributes: image_index (list of int into shapes), questions, answers, types (lists of str).
    Items are (image: (3, H, W) float32 in [0, 1], question: str, answer: str, type: str).
    """

    def __init__(self, shapes: Shapes, seed: int = 0, per_image: int = 2):
        if not 1 <= per_image <= len(TYPES):
            raise ValueError(f"per_image must be between 1 and {len(TYPES)}, got {per_image}")
        self.shapes = shapes
        rng = np.random.default_rng([seed, len(shapes)])
        asked = Counter({t: 0 for t in TYPES})
        self.image_index, self.questions, self.answers, self.types = [], [], [], []
        for i, objs in enumerate(shapes.objects):
            kinds = applicable(objs)
            ties = rng.random(len(kinds))
            order = sorted(range(len(kinds)), key=lambda j: (asked[kinds[j]], ties[j]))
            for j in order[:per_image]:
                question, answer = ask(kinds[j], objs, rng)
                asked[kinds[j]] += 1
                self.image_index.append(i)
                self.questions.append(question)
                self.answers.append(answer)
                self.types.append(kinds[j])

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str, str]:
        return self.shapes.images[self.image_index[i]].float() / 255, self.questions[i], self.answers[i], self.types[i]
