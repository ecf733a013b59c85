"""Hugging Face transformers models with mmfast's fused losses, in one call.

    from mmfast.integrations.transformers import apply_mmfast
    model = BertForMaskedLM(config)      # or RoBERTa, XLM-R, ModernBERT; CLIPModel, SiglipModel
    apply_mmfast(model)                  # this model; apply_mmfast(BertForMaskedLM): every one

Masked LM (BertForMaskedLM, RobertaForMaskedLM, XLMRobertaForMaskedLM, ModernBertForMaskedLM). Their
own forward projects every position onto the vocabulary and holds the (T, V) logits, although only
the ~15% masked positions count. Patched, in training mode with labels, forward gathers the positions
whose label is kept (not −100) first, runs the head's transform (dense → activation → LayerNorm) on
those rows only, and computes the loss with mmfast.linear_cross_entropy against the decoder's weight
and bias: the same loss and gradients, no logits. What changes:
  - the output is the model's MaskedLMOutput with logits=None (a tuple without logits when
    return_dict=False);
  - num_items_in_batch (passed by Trainer under gradient accumulation) gives sum / num_items_in_batch,
    as transformers' own losses do; BERT's, RoBERTa's and XLM-R's forwards ignore it and average
    each micro-batch;
  - a batch with no masked position gives NaN with zero gradients, as the model's own does.
In eval mode, or without labels, the model's own forward runs: logits as before.

CLIPModel, SiglipModel. Patched, in training mode with return_loss=True, the loss is mmfast.clip_loss
(or siglip_loss) of the normalised embeddings with the model's logit_scale (and logit_bias): the
model's value, without the N×N similarity matrix, so logits_per_image and logits_per_text are None
(and, with transformers 4.x, whose get_*_features return bare tensors for CLIP, so are
text_model_output and vision_model_output). Otherwise the model's own forward runs.

Patching a class affects every instance, made before or after (patch the class for nn.DataParallel,
whose replicas copy an instance's attributes); patching an instance replaces its forward only (a
bound method). The patched forward shows the model's own signature (Trainer reads it to keep the
dataset's columns). A subclass that defines its own forward is refused: mmfast replaces the
supported class's forward only. revert_mmfast undoes either. transformers is not a dependency of
mmfast: it is imported when first needed, and must be 4.46 or newer (tested: 5.24).
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from types import MethodType
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.contrastive import clip_loss, siglip_loss
from mmfast.cross_entropy import linear_cross_entropy
from mmfast.nn.cross_entropy import autocast_operands

MIN_VERSION = (4, 46)
IGNORE_INDEX = -100  # the label of an unmasked position, as transformers' collators and losses use


@dataclass(frozen=True)
class _MaskedLM:
    """Where a masked-LM model keeps its encoder (an attribute name) and its head: head(model) →
    (transform: rows (T, H) → (T, H), decoder: the nn.Linear onto the vocabulary)."""
    encoder: str
    head: Callable[[nn.Module], tuple[Callable[[Tensor], Tensor], nn.Linear]]


def _bert_head(model):
    predictions = model.cls.predictions
    return predictions.transform, predictions.decoder


def _roberta_head(model):
    head = model.lm_head
    return (lambda x: head.layer_norm(F.gelu(head.dense(x)))), head.decoder


def _modernbert_head(model):
    return model.head, model.decoder


MASKED_LM = {
    "BertForMaskedLM": _MaskedLM("bert", _bert_head),
    "RobertaForMaskedLM": _MaskedLM("roberta", _roberta_head),
    "XLMRobertaForMaskedLM": _MaskedLM("roberta", _roberta_head),
    "ModernBertForMaskedLM": _MaskedLM("model", _modernbert_head),
}
CONTRASTIVE = {"CLIPModel": "clip", "SiglipModel": "siglip"}


def apply_mmfast(model_or_class, *, mlm: bool = True, contrastive: bool = True, backend: Optional[str] = None):
    """Patches a supported model (an instance or its class; subclasses count) to compute its
    training loss with mmfast, and returns it. mlm / contrastive: whether to patch a masked-LM model /
    a CLIP or SigLIP model (one that is not wanted is returned unchanged). backend: mmfast's backend
    for the loss (None: by device). Applying it again only updates the backend."""
    family, _ = _family(model_or_class)
    if (family in MASKED_LM and mlm) or (family in CONTRASTIVE and contrastive):
        _patch(model_or_class, _masked_lm_forward if family in MASKED_LM else _contrastive_forward, backend)
    return model_or_class


def apply_mmfast_to_masked_lm(model_or_class, *, backend: Optional[str] = None):
    """apply_mmfast for a masked-LM model (BERT, RoBERTa, XLM-R, ModernBERT); anything else is an error."""
    return _apply_one(model_or_class, MASKED_LM, _masked_lm_forward, backend)


def apply_mmfast_to_contrastive(model_or_class, *, backend: Optional[str] = None):
    """apply_mmfast for CLIPModel or SiglipModel; anything else is an error."""
    return _apply_one(model_or_class, CONTRASTIVE, _contrastive_forward, backend)


def revert_mmfast(model_or_class):
    """Undoes apply_mmfast on this instance or class (a no-op where it was not applied)."""
    if isinstance(model_or_class, type):
        if "_mmfast_saved" in vars(model_or_class):
            saved = model_or_class._mmfast_saved
            if saved is None:  # the class inherited its forward
                del model_or_class.forward
            else:
                model_or_class.forward = saved
            del model_or_class._mmfast_saved, model_or_class._mmfast_backend
    elif _is_mmfast(vars(model_or_class).get("forward")):
        del model_or_class.forward, model_or_class._mmfast_backend
    return model_or_class


def is_patched(model) -> bool:
    """Whether this model's forward is mmfast's (through its own patch or its class's)."""
    return _is_mmfast(getattr(model.forward, "__func__", model.forward))


# ---- patching ---------------------------------------------------------------------------------

def _apply_one(model_or_class, table, forward, backend):
    family, name = _family(model_or_class)
    if family not in table:
        raise TypeError(f"model_or_class must be one of {sorted(table)} (or a subclass), got {name}")
    _patch(model_or_class, forward, backend)
    return model_or_class


def _family(model_or_class) -> tuple[str, str]:
    """The supported class this model or class is (or derives from), and its own name."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if not issubclass(cls, nn.Module):
        raise TypeError(f"model_or_class must be a transformers model or model class, got {cls.__name__}")
    _check_transformers()
    base = _supported_base(cls)
    if base is None:
        supported = sorted(MASKED_LM) + sorted(CONTRASTIVE)
        raise TypeError(f"model_or_class must be one of {supported} (or a subclass), got {cls.__name__}")
    return base.__name__, cls.__name__


def _supported_base(cls) -> Optional[type]:
    return next((c for c in cls.__mro__ if c.__name__ in MASKED_LM or c.__name__ in CONTRASTIVE), None)


def _is_mmfast(function) -> bool:
    return hasattr(function, "_mmfast_original")


def _own_forward(cls) -> tuple[type, Callable]:
    """The class of cls's MRO whose forward runs, and that forward as it was before any patch."""
    for owner in cls.__mro__:
        forward = vars(owner).get("forward")
        if forward is not None:
            return owner, getattr(forward, "_mmfast_original", forward)
    raise TypeError(f"{cls.__name__} has no forward")


def _patch(target, impl, backend) -> None:
    """Replaces the forward of target (a class, or one instance) with impl wrapped around the
    supported class's own forward. The wrapper shows that forward's signature: Trainer reads it
    to pick the dataset's columns and the label names."""
    from mmfast import _backends

    if backend is not None and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be None or one of {_backends.BACKENDS}, got {backend!r}")
    cls = target if isinstance(target, type) else type(target)
    owner, original = _own_forward(cls)
    base = _supported_base(cls)
    if owner is not base:
        raise TypeError(f"{cls.__name__}'s forward is {owner.__name__}'s own, not {base.__name__}'s: mmfast "
                        f"replaces {base.__name__}'s forward only (call mmfast's losses in yours)")
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        return impl(self, original, signature, args, kwargs)

    forward.__signature__, forward.__doc__, forward._mmfast_original = signature, impl.__doc__, original
    if isinstance(target, type):
        if not _is_mmfast(vars(target).get("forward")):
            target._mmfast_saved = vars(target).get("forward")
        target.forward = forward
    else:
        current = vars(target).get("forward")
        if current is not None and not _is_mmfast(getattr(current, "__func__", current)):
            raise ValueError(f"this {cls.__name__}'s forward is already replaced on the instance (by "
                             f"accelerate's hooks, say): patch the class before building the model instead, "
                             f"apply_mmfast({cls.__name__})")
        target.forward = MethodType(forward, target)  # nn.DataParallel's replicas need the class patched
    target._mmfast_backend = backend


def _check_transformers():
    """transformers, once it is known to be importable and new enough."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError("mmfast.integrations.transformers needs the `transformers` package "
                          "(pip install 'transformers>=4.46')") from exc
    version = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if version < MIN_VERSION:
        raise ImportError(f"mmfast.integrations.transformers needs transformers>=4.46, found "
                          f"transformers {transformers.__version__}")
    return transformers


def _bound(model, signature: inspect.Signature, args, kwargs) -> tuple[dict, dict, object]:
    """A call's arguments bound to the model's own forward by name: (named, its **kwargs,
    num_items_in_batch). num_items_in_batch is taken first: transformers 4.x's BERT-family
    forwards take no **kwargs."""
    kwargs = dict(kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    named = dict(signature.bind(model, *args, **kwargs).arguments)
    named.pop(next(iter(signature.parameters)))  # self
    extra = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(named.pop(name, {}))
    return named, extra, num_items


def _wants_dict(model, return_dict) -> bool:
    return getattr(model.config, "return_dict", True) if return_dict is None else bool(return_dict)


# ---- masked LM --------------------------------------------------------------------------------

def _masked_lm_forward(self, original, signature, args, kwargs):
    """The patched forward of a masked-LM model (mmfast.integrations.transformers)."""
    named, extra, num_items = _bound(self, signature, args, kwargs)
    labels = named.pop("labels", None)
    if labels is None or not self.training:
        return original(self, *args, **kwargs)
    spec = MASKED_LM[_supported_base(type(self)).__name__]
    return_dict = named.pop("return_dict", extra.pop("return_dict", None))
    outputs = getattr(self, spec.encoder)(**named, **extra, return_dict=True)
    loss = _masked_lm_loss(self, spec, outputs[0], labels, num_items)
    output_class = importlib.import_module("transformers.modeling_outputs").MaskedLMOutput
    out = output_class(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if _wants_dict(self, return_dict) else out.to_tuple()


def _masked_lm_loss(model, spec: _MaskedLM, hidden: Tensor, labels: Tensor, num_items) -> Tensor:
    """The model's masked-LM loss from the encoder's output hidden (B, S, H) and labels (B, S)."""
    labels = labels.to(hidden.device).reshape(-1)
    keep = labels != IGNORE_INDEX
    if getattr(model, "sparse_prediction", False):  # ModernBERT drops these rows before its loss
        keep &= labels != model.sparse_pred_ignore_index
    transform, decoder = spec.head(model)
    rows = transform(hidden.reshape(labels.shape[0], -1)[keep])
    rows, weight, bias = autocast_operands(rows, decoder.weight, decoder.bias)
    options = dict(ignore_index=IGNORE_INDEX, backend=model._mmfast_backend)
    if num_items is not None:
        total = linear_cross_entropy(rows, weight, labels[keep], bias=bias, reduction="sum", **options)
        return total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)
    mean = linear_cross_entropy(rows, weight, labels[keep], bias=bias, reduction="mean", **options)
    # No masked position: the model's own cross_entropy gives NaN (0 / 0), with zero gradients.
    return torch.where(keep.any(), mean, torch.full_like(mean, float("nan")))


# ---- CLIP / SigLIP ----------------------------------------------------------------------------

def _contrastive_forward(self, original, signature, args, kwargs):
    """The patched forward of CLIPModel / SiglipModel (mmfast.integrations.transformers)."""
    named, extra, _ = _bound(self, signature, args, kwargs)
    if not (named.get("return_loss") and self.training):
        return original(self, *args, **kwargs)
    base = _supported_base(type(self))
    family = CONTRASTIVE[base.__name__]
    return_dict = named.pop("return_dict", extra.pop("return_dict", None))
    for name in ("output_attentions", "output_hidden_states"):  # transformers 4.x passes them by name
        if name in named:
            extra[name] = named.pop(name)
    image_args = dict(pixel_values=named.get("pixel_values"),
                      interpolate_pos_encoding=named.get("interpolate_pos_encoding", False))
    text_args = dict(input_ids=named.get("input_ids"), attention_mask=named.get("attention_mask"),
                     position_ids=named.get("position_ids"))
    if family == "clip":  # the projected embeddings (5.x: an output whose pooler_output they are)
        vision, text = self.get_image_features(**image_args, **extra), self.get_text_features(**text_args, **extra)
    else:
        vision, text = self.vision_model(**image_args, **extra), self.text_model(**text_args, **extra)
    image_embeds, text_embeds = (_normalized(getattr(o, "pooler_output", o)) for o in (vision, text))
    image_embeds = image_embeds.to(text_embeds.device)
    backend = self._mmfast_backend
    scale = self.logit_scale.to(text_embeds.device).exp()
    if family == "clip":
        loss = clip_loss(image_embeds, text_embeds, scale, backend=backend)
    else:
        loss = siglip_loss(image_embeds, text_embeds, scale, self.logit_bias.to(text_embeds.device), backend=backend)
    output_class = getattr(sys.modules[base.__module__], "CLIPOutput" if family == "clip" else "SiglipOutput")
    out = output_class(loss=loss, logits_per_image=None, logits_per_text=None, text_embeds=text_embeds,
                       image_embeds=image_embeds, text_model_output=text if not torch.is_tensor(text) else None,
                       vision_model_output=vision if not torch.is_tensor(vision) else None)
    return out if _wants_dict(self, return_dict) else out.to_tuple()


def _normalized(x: Tensor) -> Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)
