"""mmfast.integrations.transformers: a patched Hugging Face model gives its own loss and gradients.

Tiny models built in code (no downloads), fp32. Each patched model is a deep copy of an unpatched
one, run on the same batch under the same seed (dropout on), and compared: the loss, and every
parameter's gradient to 1e-5 relative (an absolute floor of 1e-6 × the model's largest gradient
covers gradients that are zero in exact arithmetic, as the attention keys' bias).
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (make setup)")

from mmfast.integrations import transformers as hf  # noqa: E402

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_VOCAB = 97


def _masked_lm(name: str, **config):
    base = dict(vocab_size=_VOCAB, max_position_embeddings=64, **_LAYERS)
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**base, **config))
    if name in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaForMaskedLM if name == "roberta" else transformers.XLMRobertaForMaskedLM
        config_cls = transformers.RobertaConfig if name == "roberta" else transformers.XLMRobertaConfig
        return cls(config_cls(**base, pad_token_id=1, bos_token_id=0, eos_token_id=2, **config))
    tokens = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    return transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**base, **tokens, **config))


def _batch(masked: float, seed: int = 0):
    """input_ids and attention_mask (3, 17) with padding in row 1, and labels with `masked` of the
    positions kept (at least one unless masked = 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, _VOCAB, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    keep = torch.rand(ids.shape, generator=g) < masked
    if masked > 0:
        keep[0, 3] = True
    return ids, mask, torch.where(keep, ids, -100)


def _pair(make):
    torch.manual_seed(0)
    ref = make().train()
    patched = hf.apply_mmfast(copy.deepcopy(ref))
    return ref, patched


def _run(model, loss_of=lambda out: out.loss, **inputs):
    torch.manual_seed(1)  # the same dropout masks in both models
    out = model(**inputs)
    loss = loss_of(out)
    loss.backward()
    return out, loss


def _assert_same_grads(model, ref):
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())  # 0 when nothing was masked
    for name, p in model.named_parameters():
        if name not in grads:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


MASKED_LMS = ["bert", "roberta", "xlm-roberta", "modernbert"]


@pytest.mark.parametrize("name", MASKED_LMS)
@pytest.mark.parametrize("masked", [0.0, 0.15, 1.0])
def test_masked_lm_loss_and_grads_match(name, masked):
    ref, model = _pair(lambda: _masked_lm(name))
    ids, mask, labels = _batch(masked)
    out_ref, loss_ref = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out, loss = _run(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out_ref.logits is not None
    if masked == 0:  # no masked position: 0 / 0 in both, with zero gradients
        assert loss.isnan() and loss_ref.isnan()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    else:
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)


def test_modernbert_sparse_prediction_matches():
    ref, model = _pair(lambda: _masked_lm("modernbert", sparse_prediction=True))
    ids, mask, labels = _batch(0.15)
    _, loss_ref = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    _, loss = _run(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)


@pytest.mark.parametrize("name", ["bert", "modernbert"])
def test_num_items_in_batch_sums_then_divides(name):
    """Trainer's gradient accumulation: the loss is the batch's sum over masked positions divided
    by the count over all micro-batches (BERT's own forward ignores it; ModernBERT's honours it)."""
    ref, model = _pair(lambda: _masked_lm(name))
    ids, mask, labels = _batch(0.15)
    items = torch.tensor(50)

    def summed(out):
        return F.cross_entropy(out.logits.reshape(-1, _VOCAB), labels.reshape(-1), reduction="sum") / items

    _, loss_ref = _run(ref, summed, input_ids=ids, attention_mask=mask, labels=labels)
    _, loss = _run(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    _assert_same_grads(model, ref)
    assert not torch.allclose(loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("name", MASKED_LMS)
def test_eval_and_unlabelled_calls_return_logits_as_before(name):
    ref, model = _pair(lambda: _masked_lm(name))
    ids, mask, labels = _batch(0.15)
    with torch.no_grad():
        torch.manual_seed(1)
        unlabelled_ref = ref(input_ids=ids, attention_mask=mask)
        torch.manual_seed(1)
        unlabelled = model(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(unlabelled.logits, unlabelled_ref.logits)
        ref.eval(), model.eval()
        out_ref, out = ref(input_ids=ids, attention_mask=mask, labels=labels), model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, out_ref.logits)
    torch.testing.assert_close(out.loss, out_ref.loss)


def test_positional_call_and_return_dict_false():
    ref, model = _pair(lambda: _masked_lm("bert"))
    ids, mask, labels = _batch(0.15)
    torch.manual_seed(1)
    loss_ref = ref(ids, mask, labels=labels).loss
    torch.manual_seed(1)
    out = model(ids, mask, None, None, None, None, None, labels, output_hidden_states=True, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2  # (loss, hidden_states): no logits
    torch.testing.assert_close(out[0], loss_ref, rtol=1e-5, atol=0)
    assert len(out[1]) == 3  # embeddings and two layers


def test_autocast_bf16_matches_the_model_under_autocast():
    ref, model = _pair(lambda: _masked_lm("bert"))
    ids, mask, labels = _batch(0.15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_ref = _run(ref, input_ids=ids, attention_mask=mask, labels=labels)
        _, loss = _run(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(loss.float(), loss_ref.float(), rtol=2e-2, atol=0)
    w, w_ref = model.bert.embeddings.word_embeddings.weight.grad, ref.bert.embeddings.word_embeddings.weight.grad
    assert (w - w_ref).norm() < 0.05 * w_ref.norm()


def test_class_patch_reaches_every_instance_and_reverts():
    cls = transformers.RobertaForMaskedLM
    ids, mask, labels = _batch(0.15)
    try:
        assert hf.apply_mmfast(cls) is cls and hf.apply_mmfast(cls, backend="torch") is cls  # twice: no double wrap
        torch.manual_seed(0)
        model = _masked_lm("roberta").train()
        assert hf.is_patched(model) and model._mmfast_backend == "torch"
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    finally:
        hf.revert_mmfast(cls)
    assert not hf.is_patched(model)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


@pytest.mark.parametrize("target", ["instance", "class"])
def test_patched_forward_shows_the_models_signature(target):
    """Trainer keeps the dataset's columns the forward names and finds the labels by it."""
    import inspect

    cls = transformers.BertForMaskedLM
    model = _masked_lm("bert")
    own = list(inspect.signature(model.forward).parameters)
    try:
        hf.apply_mmfast(model if target == "instance" else cls)
        assert hf.is_patched(model)
        assert list(inspect.signature(model.forward).parameters) == own
        assert transformers.utils.find_labels(cls) == ["labels"]
    finally:
        hf.revert_mmfast(cls)


def test_subclass_patched_after_its_base_runs_and_reverts():
    class Mine(transformers.BertForMaskedLM):
        pass

    ids, mask, labels = _batch(0.15)
    try:
        hf.apply_mmfast(transformers.BertForMaskedLM)
        hf.apply_mmfast(Mine)
        torch.manual_seed(0)
        model = Mine(_masked_lm("bert").config)
        assert model.train()(input_ids=ids, attention_mask=mask, labels=labels).logits is None
        assert model.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
    finally:
        hf.revert_mmfast(Mine)
        hf.revert_mmfast(transformers.BertForMaskedLM)
    assert not hf.is_patched(model) and "forward" not in vars(Mine)
    assert model.train()(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_forwards_mmfast_cannot_keep_are_refused():
    class OwnForward(transformers.BertForMaskedLM):
        def forward(self, input_ids=None, labels=None):
            return super().forward(input_ids=input_ids, labels=labels)

    with pytest.raises(TypeError, match="OwnForward's forward is OwnForward's own, not BertForMaskedLM's"):
        hf.apply_mmfast(OwnForward)
    model = _masked_lm("bert")
    model.forward = lambda *args, **kwargs: None  # as accelerate's hooks replace it
    with pytest.raises(ValueError, match=r"patch the class before building the model instead"):
        hf.apply_mmfast(model)


def test_instance_patch_leaves_other_instances_and_reverts():
    ref, model = _pair(lambda: _masked_lm("bert"))
    assert hf.is_patched(model) and not hf.is_patched(ref)
    hf.revert_mmfast(model)
    ids, mask, labels = _batch(0.15)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def _contrastive(name: str):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    if name == "clip":
        config = transformers.CLIPConfig(text_config=dict(text, projection_dim=16),
                                         vision_config=dict(vision, projection_dim=16), projection_dim=16)
        return transformers.CLIPModel(config)
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))


def _image_text_batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (n, 9), generator=g)
    ids[:, -1] = 1  # the end-of-text token CLIP pools at
    return dict(input_ids=ids, pixel_values=torch.randn(n, 3, 16, 16, generator=g), return_loss=True)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_contrastive_loss_and_grads_match(name):
    ref, model = _pair(lambda: _contrastive(name))
    batch = _image_text_batch()
    out_ref, loss_ref = _run(ref, **batch)
    out, loss = _run(model, **batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert out.logits_per_image is None and out.logits_per_text is None
    torch.testing.assert_close(out.image_embeds, out_ref.image_embeds)
    _assert_same_grads(model, ref)
    assert model.logit_scale.grad.abs() > 0
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits_per_image.shape == (6, 6)


def test_missing_or_old_transformers_is_a_clear_error(monkeypatch):
    model = _masked_lm("bert")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.2")
    with pytest.raises(ImportError, match=r"transformers>=4\.46, found transformers 4\.40\.2"):
        hf.apply_mmfast(model)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="needs the `transformers` package"):
        hf.apply_mmfast(model)


def test_unsupported_models_and_arguments_are_named():
    with pytest.raises(TypeError, match=r"model_or_class must be one of .*BertForMaskedLM.*got Linear"):
        hf.apply_mmfast(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model_or_class must be a transformers model"):
        hf.apply_mmfast(3)
    with pytest.raises(TypeError, match=r"one of \['CLIPModel', 'SiglipModel'\].*got BertForMaskedLM"):
        hf.apply_mmfast_to_contrastive(transformers.BertForMaskedLM)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        hf.apply_mmfast(_masked_lm("bert"), backend="gpu")
    model = _masked_lm("bert")
    assert hf.apply_mmfast(model, mlm=False) is model and not hf.is_patched(model)
