"""mmfast.models: the towers' shapes, masks and gradients, the fusion encoder's MLM loss against the
naive logits, CLIPModel's temperature, the tower protocol, and configuration errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.models import CLIPModel, ImageConfig, ImageEncoder, ModelConfig, TextConfig, TextEncoder
from tests.helpers import rel_err

VOCAB = 50


def batch(b=3, s=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 6:] = False
    return images, ids, mask


def tiny(**kw):
    torch.manual_seed(0)
    return CLIPModel(ModelConfig.preset("tiny", VOCAB), **kw)


def test_towers_return_pooled_features_and_tokens():
    model = tiny()
    images, ids, mask = batch()
    pooled, patches = model.visual(images)
    assert pooled.shape == (3, 64) and patches.shape == (3, (32 // 8) ** 2, 128)
    pooled, hidden = model.text(ids, mask)
    assert pooled.shape == (3, 64) and hidden.shape == (3, 9, 128)
    a, b, scale, bias = model(images, ids, mask)
    assert torch.allclose(a.norm(dim=1), torch.ones(3)) and torch.allclose(b.norm(dim=1), torch.ones(3))
    assert abs(scale.item() - 1 / 0.07) < 1e-4 and bias is None


def test_padding_is_not_attended_to():
    model = tiny().eval()
    _, ids, mask = batch()
    other = ids.clone()
    other[0, 6:] = (ids[0, 6:] + 1) % VOCAB  # only padded positions differ
    assert torch.equal(model.encode_text(ids, mask)[0], model.encode_text(other, mask)[0])
    assert not torch.equal(model.encode_text(ids)[0], model.encode_text(other)[0])


def test_every_parameter_gets_a_gradient_from_clip_plus_mlm():
    model = tiny()
    images, ids, mask = batch()
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    a, b, scale, _ = model(images, ids, mask)
    _, patches = model.visual(images)
    _, hidden = model.text(ids, mask)
    (mmfast.clip_loss(a, b, scale) + model.fusion(hidden, patches, labels, mask)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_fusion_mlm_loss_is_the_naive_one_and_uses_the_image():
    model = tiny().eval()  # no dropout: the two passes below must see the same network
    images, ids, mask = batch()
    labels = torch.full_like(ids, -100)
    labels[:, [1, 4]] = ids[:, [1, 4]]
    _, patches = model.visual(images)
    _, hidden = model.text(ids, mask)
    fused = model.fusion(hidden, patches, labels, mask)
    logits = model.fusion.logits(hidden, patches, mask)
    naive = F.cross_entropy(logits.reshape(-1, VOCAB).double(), labels.reshape(-1), ignore_index=-100)
    assert rel_err(fused, naive) < 1e-5
    assert model.fusion.head.weight is model.text.embed.weight  # tied, as BERT
    blank = model.fusion(hidden, torch.zeros_like(patches), labels, mask)
    assert abs(blank.item() - fused.item()) > 1e-4  # the text positions attend to the patches


def test_logit_scale_clamp_and_siglip_init():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert abs(model.logit_scale.item() - math.log(100)) < 1e-6
    torch.manual_seed(0)
    siglip = CLIPModel(ModelConfig(text=TextConfig(vocab_size=VOCAB), fusion=None, logit_bias=True))
    _, _, scale, bias = siglip(*batch())
    assert abs(scale.item() - 10.0) < 1e-4 and bias.item() == -10.0 and siglip.fusion is None


class FeatureTower(nn.Module):
    """A stand-in tower: any module returning (pooled (B, E), tokens (B, L, width))."""

    def __init__(self, dim_in, e):
        super().__init__()
        self.lin = nn.Linear(dim_in, e)

    def forward(self, x):
        x = x.flatten(1)[:, :16]
        return self.lin(x), x[:, None, :]


def test_any_module_with_the_protocol_stands_in_for_a_tower():
    model = tiny(image_tower=FeatureTower(16, 64))
    images, ids, mask = batch()
    a, b, scale, _ = model(images, ids, mask)
    mmfast.clip_loss(a, b, scale).backward()
    assert model.visual.lin.weight.grad is not None


@pytest.mark.parametrize("make,message", [
    (lambda: ImageEncoder(ImageConfig(image_size=30, patch_size=4)), "image_size"),
    (lambda: TextEncoder(TextConfig(width=130, heads=4)), "width"),
    (lambda: ModelConfig.preset("huge", VOCAB), "preset"),
    (lambda: CLIPModel(ModelConfig(text=TextConfig(vocab_size=VOCAB, embed_dim=32))), "embed_dim"),
    (lambda: CLIPModel(ModelConfig.preset("tiny", VOCAB), text_tower=FeatureTower(16, 64)), "TextEncoder"),
    (lambda: tiny().text(torch.zeros(1, 40, dtype=torch.long)), "max_len"),
])
def test_bad_configs_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
