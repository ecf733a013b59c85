"""CLIPModel: the two towers, L2-normalised features and the learnable temperature (and bias), plus
the optional fusion encoder for masked-LM with the image as context."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.models.config import ModelConfig
from mmfast.models.encoders import FusionEncoder, ImageEncoder, TextEncoder

# open_clip's: the scale starts at 1/0.07 and is clamped to ≤ 100 after each step.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


class CLIPModel(nn.Module):
    """image (B, C, H, W), ids (B, S), mask (B, S) → (image features (B, E), text features (B, E),
    logit_scale.exp(), logit_bias or None): open_clip's forward convention, features L2-normalised.

    image_tower / text_tower: any nn.Module whose forward returns (pooled (B, E), tokens (B, L, width))
    may replace the built ones (a timm or transformers model wrapped to that protocol); both must
    return the same E. With config.logit_bias the scale starts at ln 10 and the bias at −10 (SigLIP).
    """

    def __init__(self, config: ModelConfig, image_tower: Optional[nn.Module] = None,
                 text_tower: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        if image_tower is None and text_tower is None and config.image.embed_dim != config.text.embed_dim:
            raise ValueError(f"image.embed_dim ({config.image.embed_dim}) and text.embed_dim "
                             f"({config.text.embed_dim}) must be equal: the losses compare the two features")
        self.visual = image_tower if image_tower is not None else ImageEncoder(config.image)
        self.text = text_tower if text_tower is not None else TextEncoder(config.text)
        init = math.log(10.0) if config.logit_bias else INIT_LOGIT_SCALE
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if config.logit_bias else None
        self.fusion = None
        if config.fusion is not None:
            if not isinstance(self.text, TextEncoder):
                raise ValueError("config.fusion needs the built TextEncoder (the MLM head ties its embedding)")
            self.fusion = FusionEncoder(config.fusion, self.text, config.image.width)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        pooled, _ = self.visual(images)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, ids: Tensor, mask: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
        pooled, _ = self.text(ids, mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: Tensor, ids: Tensor, mask: Optional[Tensor] = None):
        return self.encode_image(images), self.encode_text(ids, mask), self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """After each optimizer step, as open_clip: logit_scale ≤ ln 100."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
