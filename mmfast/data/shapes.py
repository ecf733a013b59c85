"""The embedded `shapes` dataset: procedurally drawn images of coloured shapes with their captions.

Each image holds one to three objects (a size, a colour and a shape each) on a dark, slightly noisy
background; its caption names them and, for two objects, their spatial relation. Six (colour, shape)
pairs never occur in the training split and occur in every test image, so the test split measures
whether a model composes attributes rather than memorising pairs.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Each colour once and each shape twice: every colour and every shape still occurs in training.
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                      ("yellow", "triangle"), ("magenta", "circle"), ("cyan", "square")})
TEMPLATES = ("a {}", "a small {}", "a large {}")
# The words of the visual questions (mmfast.data.questions) that captions do not use, and their answers'.
QUESTION_WORDS = ("what", "colour", "shape", "is", "the", "object", "how", "many", "shapes", "are", "there", "?",
                  "yes", "no", "one", "two", "three")

# An object's half-extent (circle radius, half the square's side, the triangle's half-base and
# half-height) as a fraction of the image size.
RADIUS_FRACTION = {"small": 1 / 8, "large": 1 / 5}
RGB = np.array([(230, 40, 40), (40, 200, 60), (50, 90, 240), (230, 220, 40), (220, 50, 220), (40, 210, 220)],
               dtype=np.uint8)
BACKGROUND = (12, 28)  # background pixels are uniform in [12, 28) per channel
SPLITS = ("train", "test")
# Objects keep this many pixels from the border of their cell, so neighbours never touch.
CELL_MARGIN = 0.75


class Obj(NamedTuple):
    """One drawn object; (x, y) is the centre of its bounding box in pixels, y growing downwards."""
    size: str
    color: str
    shape: str
    x: float
    y: float


def class_index(color: str, shape: str) -> int:
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


class Shapes(torch.utils.data.Dataset):
    """`size` generated image–caption pairs of one split, bit-identical for the same arguments.

    Attributes:
        images: (N, 3, H, W) uint8, H = W = image_size
        captions: list of N str, e.g. "a small red circle above a large blue square"
        objects: list of N tuples of Obj, in the order the caption names them
        labels: (N,) int64, the class (see classnames()) of the first object
    Items are (image: (3, H, W) float32 in [0, 1], caption: str). centred: one object per image,
    at its centre (what a text-to-image generator is asked to draw).
    """

    def __init__(self, split: str = "train", size: int = 10000, *, seed: int = 0, image_size: int = 32,
                 min_shapes: int = 1, max_shapes: int = 3, centred: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if not 1 <= min_shapes <= 3:
            raise ValueError(f"min_shapes must be between 1 and 3, got {min_shapes}")
        if not min_shapes <= max_shapes <= 3:
            raise ValueError(f"max_shapes must be between min_shapes ({min_shapes}) and 3, got {max_shapes}")
        if centred and max_shapes != 1:
            raise ValueError(f"centred=True draws one object at the image's centre: max_shapes must be 1, got {max_shapes}")
        self.split = split
        self.image_size = image_size
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        counts, size_ids, class_ids, xy = _layout(rng, split, size, image_size, min_shapes, max_shapes)
        if centred:
            xy[:, 0] = image_size / 2
        self.images = torch.from_numpy(_draw(rng, counts, size_ids, class_ids, xy, image_size))
        self.objects = [_objects(k, s, c, p) for k, s, c, p in
                        zip(counts.tolist(), size_ids.tolist(), class_ids.tolist(), xy.tolist())]
        self.captions = [caption(objs) for objs in self.objects]
        self.labels = torch.tensor([class_index(objs[0].color, objs[0].shape) for objs in self.objects],
                                   dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i].float() / 255, self.captions[i]

    @staticmethod
    def classnames() -> list[str]:
        """The 18 "colour shape" names, in label order."""
        return [f"{color} {shape}" for color in COLORS for shape in SHAPES]

    @staticmethod
    def attribute_words() -> list[str]:
        """The words only the image can tell: what masked-language modelling masks."""
        return list(COLORS + SHAPES + SIZES)

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word a caption can contain, in a fixed order."""
        return Shapes.attribute_words() + ["a", "above", "below", "left", "right", "of", ",", "and", *QUESTION_WORDS]


def _layout(rng: np.random.Generator, split: str, n: int, image_size: int, min_shapes: int, max_shapes: int):
    """Draws what each image holds and where, for up to three object slots per image.

    Returns counts (n,) objects per image; size_ids, class_ids (n, 3); xy (n, 3, 2) centres in pixels.
    Slots past an image's count are drawn too (keeping the random stream independent of the counts)
    and ignored.
    """
    counts = rng.integers(min_shapes, max_shapes + 1, size=n)
    size_ids = rng.integers(0, len(SIZES), size=(n, 3))
    held = np.array([class_index(c, s) for c, s in sorted(HELD_OUT)])
    seen = np.setdiff1d(np.arange(len(COLORS) * len(SHAPES)), held)
    if split == "train":
        class_ids = rng.choice(seen, size=(n, 3))
    else:
        class_ids = rng.integers(0, len(COLORS) * len(SHAPES), size=(n, 3))
        slot = rng.integers(0, counts)
        class_ids[np.arange(n), slot] = rng.choice(held, size=n)
    # Each object gets its own quadrant of the image, so objects cannot overlap and any number of them
    # always fits; within its quadrant the object's position is uniform.
    cells = np.argsort(rng.random((n, 4)), axis=1)[:, :3]
    corner = np.stack([cells % 2, cells // 2], axis=-1) * (image_size / 2)  # (n, 3, 2): the cell's top-left
    radius = np.array([RADIUS_FRACTION[s] for s in SIZES])[size_ids][..., None] * image_size
    room = image_size / 2 - 2 * (radius + CELL_MARGIN)  # how far the centre can move inside the cell
    xy = corner + CELL_MARGIN + radius + rng.random((n, 3, 2)) * room
    return counts, size_ids, class_ids, xy


def _draw(rng: np.random.Generator, counts, size_ids, class_ids, xy, image_size: int) -> np.ndarray:
    """Paints the objects on noisy backgrounds → (n, 3, H, W) uint8. A pixel belongs to an object
    when its centre lies inside the shape; one boolean mask per object, batched over images."""
    n = len(counts)
    images = rng.integers(*BACKGROUND, size=(n, 3, image_size, image_size), dtype=np.uint8)
    grid = np.arange(image_size) + 0.5
    radius = np.array([RADIUS_FRACTION[s] for s in SIZES])[size_ids] * image_size
    for slot in range(3):
        for shape in range(len(SHAPES)):
            idx = np.nonzero((slot < counts) & (class_ids[:, slot] % len(SHAPES) == shape))[0]
            if len(idx) == 0:
                continue
            r = radius[idx, slot, None, None]
            dx = grid[None, None, :] - xy[idx, slot, 0, None, None]  # (m, 1, W)
            dy = grid[None, :, None] - xy[idx, slot, 1, None, None]  # (m, H, 1)
            if SHAPES[shape] == "circle":
                mask = dx ** 2 + dy ** 2 <= r ** 2
            elif SHAPES[shape] == "square":
                mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
            else:  # an upward isosceles triangle: apex at the top centre, base along the bottom edge
                mask = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            color = RGB[class_ids[idx, slot] // len(SHAPES)][:, :, None, None]  # (m, 3, 1, 1)
            images[idx] = np.where(mask[:, None], color, images[idx])
    return images


def _objects(count: int, size_ids, class_ids, xy) -> tuple[Obj, ...]:
    """The first `count` slots as Obj, in caption order: three objects are named left to right."""
    objs = [Obj(SIZES[size_ids[j]], COLORS[class_ids[j] // len(SHAPES)], SHAPES[class_ids[j] % len(SHAPES)],
                xy[j][0], xy[j][1]) for j in range(count)]
    if count == 3:
        objs.sort(key=lambda o: o.x)
    return tuple(objs)


def relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b, along the axis on which their centres differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def caption(objs: tuple[Obj, ...]) -> str:
    phrases = [f"a {o.size} {o.color} {o.shape}" for o in objs]
    if len(objs) == 1:
        return phrases[0]
    if len(objs) == 2:
        return f"{phrases[0]} {relation(*objs)} {phrases[1]}"
    return f"{phrases[0]} , {phrases[1]} and {phrases[2]}"
