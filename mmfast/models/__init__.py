"""Lean encoders over mmfast's ops (design.md §5): ImageEncoder (ViT), TextEncoder, FusionEncoder
(masked-LM with the image as context) and CLIPModel, sized by the configs' dataclasses."""
from mmfast.models.clip import CLIPModel
from mmfast.models.config import FusionConfig, ImageConfig, ModelConfig, TextConfig
from mmfast.models.encoders import FusionEncoder, ImageEncoder, TextEncoder

__all__ = ["CLIPModel", "FusionConfig", "FusionEncoder", "ImageConfig", "ImageEncoder", "ModelConfig", "TextConfig",
           "TextEncoder"]
