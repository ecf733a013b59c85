"""The vqa task: question generation against the drawn objects, the answer decoder's shapes and
gradients, padding that never counts, the loss against a float64 full-logits reference, learning,
and the errors for a model or tokenizer it cannot use."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mmfast.data import COLORS, SHAPES, Shapes, Tokenizer
from mmfast.data.questions import ANSWERS, TYPES, Questions
from mmfast.data.shapes import relation
from mmfast.models import CLIPModel, ModelConfig
from mmfast.tasks.vqa import VQA
from mmfast.train import TrainConfig

TOKENIZER = Tokenizer(Shapes.vocabulary(), maskable=Shapes.attribute_words())


def make(seed: int = 0, **options) -> tuple[CLIPModel, VQA]:
    torch.manual_seed(seed)
    model = CLIPModel(ModelConfig.preset("tiny", vocab_size=TOKENIZER.vocab_size))
    task = VQA(model, TOKENIZER, TrainConfig(train_size=64, eval_size=16, seed=seed), torch.device("cpu"),
               options=options)
    return model, task


def batch_of(task: VQA, n: int = 16, start: int = 0) -> dict:
    data = task.train_data()
    return task.collate([data[i] for i in range(start, start + n)])


def loss_and_grads(model, task, batch) -> tuple[torch.Tensor, list]:
    params = [p for m in (model, task) for p in m.parameters()]
    for p in params:
        p.grad = None
    loss = task.losses(model, batch)["vqa"]
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


# ---- questions ------------------------------------------------------------------------------------
def test_answers_match_the_objects_for_every_type():
    shapes = Shapes("train", 300, seed=3)
    data = Questions(shapes, seed=3)
    assert set(data.types) == set(TYPES)
    for i, q, a, t in zip(data.image_index, data.questions, data.answers, data.types):
        objs, w = shapes.objects[i], q.split()
        assert a in ANSWERS[t]
        if t == "colour":  # what colour is the {shape} ?
            (obj,) = [o for o in objs if o.shape == w[4]]
            assert a == obj.color
        elif t == "shape":  # what shape is the {colour} object ?
            (obj,) = [o for o in objs if o.color == w[4]]
            assert a == obj.shape
        elif t == "count":
            assert q == "how many shapes are there ?" and a == ("one", "two", "three")[len(objs) - 1]
        elif t == "relation":  # is the {shape_a} {relation} the {shape_b} ?
            assert len(objs) == 2 and w[0:2] == ["is", "the"] and w[-1] == "?"
            (first,) = [o for o in objs if o.shape == w[2]]
            (second,) = [o for o in objs if o.shape == w[-2]]
            assert (relation(first, second) == " ".join(w[3:-3])) == (a == "yes")
        else:  # what is the {size} object ? → "{colour} {shape}"
            (obj,) = [o for o in objs if o.size == w[3]]
            assert a == f"{obj.color} {obj.shape}" and len(a.split()) == 2
    image, question, answer, kind = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


def test_questions_are_deterministic_balanced_and_in_the_vocabulary():
    shapes = Shapes("test", 400, seed=1)
    a, b = Questions(shapes, seed=5), Questions(shapes, seed=5)
    assert (a.image_index, a.questions, a.answers, a.types) == (b.image_index, b.questions, b.answers, b.types)
    assert Questions(shapes, seed=6).questions != a.questions
    # two per image, fewer where only "count" applies (e.g. two identical objects)
    assert 1.9 * len(shapes) <= len(a) <= 2 * len(shapes) and len(Questions(shapes, per_image=1)) == len(shapes)
    counts = Counter(a.types)
    assert min(counts[t] for t in TYPES if t != "relation") > 0.15 * len(a)  # as balanced as applicability allows
    yes = Counter(ans for ans, t in zip(a.answers, a.types) if t == "relation")
    assert abs(yes["yes"] - yes["no"]) < 0.2 * counts["relation"]
    words = set(TOKENIZER.ids)
    assert all(w in words for text in a.questions + a.answers for w in text.split())
    with pytest.raises(ValueError, match="per_image"):
        Questions(shapes, per_image=0)


# ---- the head ---------------------------------------------------------------------------------------
def test_shapes_and_gradients_reach_decoder_and_backbone():
    model, task = make()
    batch = batch_of(task, 8)
    b, s = batch["question_ids"].shape
    assert batch["images"].shape == (b, 3, 32, 32) and batch["answer_inputs"].shape == batch["answer_targets"].shape
    memory, memory_mask = task.encode(model, batch["images"], batch["question_ids"], batch["question_mask"])
    hidden = task.decode(model, batch["answer_inputs"], memory, memory_mask)
    assert memory.shape == (b, s + 1, 128) and hidden.shape == (*batch["answer_inputs"].shape, 128)
    assert torch.equal(memory_mask, torch.cat([batch["question_mask"], torch.ones(b, 1, dtype=torch.bool)], 1))
    loss = task.losses(model, batch)["vqa"]
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    head = (task.pos, task.bias, task.pooled_in.weight, task.blocks[0].kv.weight, task.blocks[-1].qkv.weight)
    backbone = (model.text.embed.weight, model.visual.patch.weight, model.fusion.image_in.weight,
                model.fusion.stack.blocks[0].qkv.weight)
    for p in head + backbone:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters()) and not VQA.frozen_backbone


def test_padding_positions_contribute_nothing():
    model, task = make()
    model.eval(), task.eval()  # no dropout: the runs compare exactly
    batch = batch_of(task, 12)
    ignored = batch["answer_targets"] == -100
    assert ignored.any() and (~ignored).any()  # one- and two-word answers: padding exists
    loss, grads = loss_and_grads(model, task, batch)

    scrambled = dict(batch, answer_inputs=torch.where(ignored, torch.randint(5, TOKENIZER.vocab_size, ignored.shape),
                                                      batch["answer_inputs"]))
    loss2, grads2 = loss_and_grads(model, task, scrambled)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)

    def pad(t, value):  # one more padded position
        return F.pad(t, (0, 1), value=value)

    longer = dict(batch, answer_inputs=pad(batch["answer_inputs"], 0), question_ids=pad(batch["question_ids"], 0),
                  answer_targets=pad(batch["answer_targets"], -100), question_mask=pad(batch["question_mask"], False))
    loss3, grads3 = loss_and_grads(model, task, longer)
    torch.testing.assert_close(loss3, loss, rtol=1e-5, atol=1e-6)
    for g, g2, g3 in zip(grads, grads2, grads3):
        torch.testing.assert_close(g2, g, rtol=0, atol=0)
        torch.testing.assert_close(g3, g, rtol=1e-4, atol=1e-6)


def test_loss_is_the_float64_teacher_forced_cross_entropy():
    model, task = make(seed=1)
    model.eval(), task.eval()
    data = task.train_data()
    items = [data[i] for i in range(10)]
    batch = task.collate(items)
    loss = task.losses(model, batch)["vqa"]
    # the reference builds its own targets from the answer strings: each word, then [SEP]
    memory = task.encode(model, batch["images"], batch["question_ids"], batch["question_mask"])
    hidden = task.decode(model, batch["answer_inputs"], *memory).double()
    logits = hidden @ model.text.embed.weight.double().T + task.bias.double()
    terms = []
    for row, (_, _, answer, _) in enumerate(items):
        targets = [TOKENIZER.ids[w] for w in answer.split()] + [TOKENIZER.sep_id]
        terms += [-logits[row, j].log_softmax(-1)[t] for j, t in enumerate(targets)]
    reference = torch.stack(terms).mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_a_few_steps_make_the_loss_fall():
    model, task = make(seed=2, decoder_depth=1)
    batch = batch_of(task, 8)
    optimizer = torch.optim.AdamW([*model.parameters(), *task.parameters()], lr=2e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = task.losses(model, batch)["vqa"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_evaluate_baseline_and_chance_report_every_type():
    model, task = make()
    model.train(), task.train()
    keys = {"vqa_exact_match", *(f"vqa_exact_match_{t}" for t in TYPES)}
    metrics, base, chance = task.evaluate(model), task.baseline(model), task.chance()
    assert model.training and task.training  # modes restored
    for m in (metrics, base, chance):
        assert set(m) <= keys and "vqa_exact_match" in m and all(0 <= v <= 1 for v in m.values())
    assert chance["vqa_exact_match_colour"] == pytest.approx(1 / len(COLORS))
    assert chance["vqa_exact_match_describe"] == pytest.approx(1 / (len(COLORS) * len(SHAPES)))
    assert VQA.headline == "vqa_exact_match"
    # greedy answers are strings of vocabulary words or None (no [SEP] within the cap)
    data = task.eval_data()
    with torch.no_grad():
        answers = task.answer(model.eval(), data[0][0][None], [data.questions[0]])
    assert answers[0] is None or all(w in TOKENIZER.ids for w in answers[0].split())


# ---- errors -----------------------------------------------------------------------------------------
def test_a_model_without_fusion_or_a_tokenizer_without_question_words_is_refused():
    config = ModelConfig.preset("tiny", vocab_size=TOKENIZER.vocab_size)
    config.fusion = None
    with pytest.raises(ValueError, match="fusion encoder.*mlm"):
        VQA(CLIPModel(config), TOKENIZER, TrainConfig(), torch.device("cpu"))
    old = Tokenizer(Shapes.attribute_words() + ["a", "above", "below", "left", "right", "of", ",", "and"])
    model = CLIPModel(ModelConfig.preset("tiny", vocab_size=old.vocab_size))
    with pytest.raises(ValueError, match="lacks the question words.*'what'"):
        VQA(model, old, TrainConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown option"):
        VQA(model, TOKENIZER, TrainConfig(), torch.device("cpu"), options={"depth": 1})
