"""Lean encoders for multimodal pretraining (design.md §5): a ViT image tower, a text tower, and a
fusion encoder for masked-LM with the image as context. Plain torch; attention is
F.scaled_dot_product_attention; sizes come from the dataclass configs in config.py.

Shapes: images (B, C, H, W); token ids (B, S) int64; an attention mask (B, S), True/1 where a token
is real. Every tower returns (pooled (B, embed_dim), tokens (B, L, width)): the projected pooled
feature (what the contrastive losses take) and the per-token hidden states (what fusion and MLM
take). Any nn.Module with that return protocol may stand in for a tower.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.models.config import BlocksConfig, FusionConfig, ImageConfig, TextConfig
from mmfast.nn import MaskedLMHead


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)). x: (B, L, width);
    key_padding: (B, L) bool, True where a key may be attended to, or None."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: Tensor, key_padding: Optional[Tensor] = None) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        mask = key_padding[:, None, None, :] if key_padding is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """config.depth Blocks of the given width and a final LayerNorm."""

    def __init__(self, width: int, config: BlocksConfig):
        super().__init__()
        c = config
        self.blocks = nn.ModuleList(Block(width, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, key_padding: Optional[Tensor] = None) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding)
        return self.norm(x)


class ImageEncoder(nn.Module):
    """ViT: patch embedding (a strided conv), a class token, learned positions, pre-norm blocks.
    forward(images (B, C, H, W)) → (pooled (B, embed_dim): the class token projected,
    patches (B, P, width): the patch tokens after the blocks)."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size ({c.image_size}) must be a multiple of patch_size ({c.patch_size})")
        self.config = c
        self.patch = nn.Conv2d(c.channels, c.width, c.patch_size, stride=c.patch_size)
        patches = (c.image_size // c.patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, c.width) * 0.02)
        self.stack = Stack(c.width, c)
        self.proj = nn.Linear(c.width, c.embed_dim, bias=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, P, width)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.stack(x)
        return self.proj(x[:, 0]), x[:, 1:]


class TextEncoder(nn.Module):
    """Token and learned position embeddings, bidirectional pre-norm blocks (the tower is also the
    masked-LM's text encoder), pooled at the first token (the CLS the tokenizer puts there).
    forward(ids (B, S), mask (B, S) or None) → (pooled (B, embed_dim), hidden (B, S, width))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.width)
        nn.init.normal_(self.embed.weight, std=0.02)  # BERT's: N(0, 1) would make the tied MLM logits huge
        self.pos = nn.Parameter(torch.randn(1, c.max_len, c.width) * 0.02)
        self.stack = Stack(c.width, c)
        self.proj = nn.Linear(c.width, c.embed_dim, bias=False)

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"ids has {ids.shape[1]} positions; the text encoder takes at most max_len = "
                             f"{self.config.max_len}")
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.stack(x, mask.bool() if mask is not None else None)
        return self.proj(x[:, 0]), x


class FusionEncoder(nn.Module):
    """Masked-LM with the image as context, single stream: the text's hidden states and the image's
    patch tokens (projected to the text width, plus a learned type embedding each) are concatenated
    and run through bidirectional blocks, so every text token attends to every patch and every
    other token. The MLM head (mmfast.nn.MaskedLMHead, its weight tied to the text embedding)
    scores the text positions only, and only the masked ones: never (B·S) × V logits.

    forward(text_hidden (B, S, Dt), patches (B, P, Di), labels (B, S) with −100 where not masked,
    mask (B, S) or None) → the MLM loss. hidden(...) → the fused text states (B, S, Dt)."""

    def __init__(self, config: FusionConfig, text: TextEncoder, image_width: int):
        super().__init__()
        c = config
        width = text.config.width
        self.image_in = nn.Linear(image_width, width)
        self.types = nn.Parameter(torch.zeros(2, width))
        self.stack = Stack(width, c)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = MaskedLMHead(width, text.config.vocab_size, tied_weight=text.embed.weight, backend=c.backend)

    def hidden(self, text_hidden: Tensor, patches: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        s = text_hidden.shape[1]
        x = torch.cat([text_hidden + self.types[0], self.image_in(patches) + self.types[1]], 1)
        keys = None
        if mask is not None:
            keys = torch.cat([mask.bool(), mask.new_ones(patches.shape[:2], dtype=torch.bool)], 1)
        return self.stack(x, keys)[:, :s]

    def forward(self, text_hidden: Tensor, patches: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.head(self.transform(self.hidden(text_hidden, patches, mask)), labels)

    def logits(self, text_hidden: Tensor, patches: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """(B, S, V) vocabulary logits, for inference (accuracy on masked words)."""
        return self.head.logits(self.transform(self.hidden(text_hidden, patches, mask)))
