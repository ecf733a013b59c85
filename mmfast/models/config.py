"""Sizes of the encoders, as dataclasses with presets: `tiny` (the demo: trains in minutes on 2 CPU
cores) and `base` (ViT-B/16 and a BERT-base-sized text tower)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BlocksConfig:
    """A stack of pre-norm transformer blocks."""
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class TowerConfig(BlocksConfig):
    """A tower: its blocks' width and the projected feature size the losses compare."""
    width: int = 128
    embed_dim: int = 64


@dataclass
class ImageConfig(TowerConfig):
    image_size: int = 32
    patch_size: int = 8  # tiny: 16 patches of 32×32 images (4×4 patches train 4× slower, no better)
    channels: int = 3


@dataclass
class TextConfig(TowerConfig):
    vocab_size: int = 256
    max_len: int = 32


@dataclass
class FusionConfig(BlocksConfig):
    """The fusion blocks run at the text tower's width."""
    depth: int = 1
    backend: Optional[str] = None  # the MLM loss's mmfast backend (None: by device)


@dataclass
class ModelConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: Optional[FusionConfig] = field(default_factory=FusionConfig)  # None: no MLM branch
    logit_bias: bool = False  # SigLIP's learnable bias (initialised to −10, the scale to ln 10)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of dataclasses.asdict; unknown fields raise ValueError naming them."""
        parts = {"image": ImageConfig, "text": TextConfig, "fusion": FusionConfig}
        kwargs = {}
        for key, value in d.items():
            kind = parts.get(key)
            if kind is not None and value is not None:
                value = _fields(kind, value, f"model.{key}")
            kwargs[key] = value
        return _fields(cls, kwargs, "model")

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> "ModelConfig":
        """`tiny` or `base`, for a tokenizer of vocab_size words."""
        if name == "tiny":  # dropout 0.1: without it the demo's model memorises the seen colour–shape pairs
            return cls(image=ImageConfig(dropout=0.1), text=TextConfig(vocab_size=vocab_size, dropout=0.1),
                       fusion=FusionConfig(dropout=0.1))
        if name == "base":
            return cls(image=ImageConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12, embed_dim=512),
                       text=TextConfig(vocab_size=vocab_size, max_len=77, width=768, depth=12, heads=12, embed_dim=512),
                       fusion=FusionConfig(depth=4, heads=12))
        raise ValueError(f"preset must be 'tiny' or 'base', got {name!r}")


def _fields(kind, d, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict of {kind.__name__} fields, got {d!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {kind.__name__} has {sorted(names)}")
    return kind(**d)
