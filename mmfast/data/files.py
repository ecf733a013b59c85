"""Users' own data: (image, caption) records in JSONL or CSV, and precomputed embeddings in .npy."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

PathLike = Union[str, Path]


class CaptionFiles(torch.utils.data.Dataset):
    """Image–caption pairs listed in a .jsonl file (one JSON object per line) or a .csv file (a header
    row naming the columns). Image paths are relative to `root` (default: the listing's folder).

    The listing is checked at construction; images are read only by __getitem__, which returns
    (image: (3, image_size, image_size) float32 in [0, 1], caption: str): the image in RGB, its
    shorter side resized to image_size (bicubic), then centre-cropped. Reading images needs Pillow.
    """

    def __init__(self, path: PathLike, *, image_size: int = 224, root: Optional[PathLike] = None,
                 image_key: str = "image", caption_key: str = "caption"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption file {path} does not exist")
        if image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        readers = {".jsonl": _jsonl_records, ".csv": _csv_records}
        if path.suffix.lower() not in readers:
            raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl or .csv")
        root = path.parent if root is None else Path(root)
        self.path = path
        self.image_size = image_size
        self.lines, self.image_paths, self.captions = [], [], []
        for line, record in readers[path.suffix.lower()](path):
            for key in (image_key, caption_key):
                if not isinstance(record.get(key), str):
                    problem = "missing key" if record.get(key) is None else "a non-string value for"
                    raise ValueError(f"{path}, line {line}: {problem} {key!r}")
            self.lines.append(line)
            self.image_paths.append(root / record[image_key])
            self.captions.append(record[caption_key])
        if not self.captions:
            raise ValueError(f"{path} holds no records")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path = self.image_paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} of record {i} ({self.path}, line {self.lines[i]}) does not exist")
        return load_image(path, self.image_size), self.captions[i]


def _jsonl_records(path: Path):
    """Yields (line number, object) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}")
            yield line, record


def _csv_records(path: Path):
    """Yields (line number, row as a dict) for each row after the header; a short row lacks its last keys."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheets often write a BOM
        reader = csv.DictReader(f)
        for row in reader:
            # DictReader fills a short row's missing columns with None, which reads as a missing key.
            yield reader.line_num, row


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """An image file → (3, image_size, image_size) float32 in [0, 1]: RGB, shorter side resized, centre crop."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("mmfast.data.CaptionFiles needs Pillow to read images: pip install Pillow") from None
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


class EmbeddingPairs(torch.utils.data.Dataset):
    """Precomputed (image, text) embedding pairs from two .npy files of shapes (N, Di) and (N, Dt),
    memory-mapped. Items are (float32 (Di,), float32 (Dt,))."""

    def __init__(self, image_npy: PathLike, text_npy: PathLike):
        self.image = _embeddings(image_npy)
        self.text = _embeddings(text_npy)
        if len(self.image) != len(self.text):
            raise ValueError(f"{image_npy} has shape {self.image.shape} and {text_npy} has shape {self.text.shape}; "
                             f"expected the same number of rows")
        self.image_dim, self.text_dim = self.image.shape[1], self.text.shape[1]

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # np.array copies the row out of the read-only memory map.
        return (torch.from_numpy(np.array(self.image[i], dtype=np.float32)),
                torch.from_numpy(np.array(self.text[i], dtype=np.float32)))


def _embeddings(path: PathLike) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} must be a .npy file holding one array, got a {type(array).__name__}")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path} must hold a 2-D floating-point array (N, D), got {array.dtype} {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{path} has no rows; expected at least one")
    return array
