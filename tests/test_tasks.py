"""Tasks on the Trainer (mmfast.tasks): classification and retrieval with mined hard negatives, the
task plumbing of TrainConfig/Trainer, and the finetune/generate/demo command lines. VQA and
generation have their own files (test_vqa.py, test_generate.py)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from mmfast.contrastive import clip_loss
from mmfast.data import COLORS, HELD_OUT, SHAPES
from mmfast.data.shapes import class_index
from mmfast.tasks import task_class
from mmfast.tasks.classify import ClassHead, restricted_cross_entropy
from mmfast.train import TrainConfig, Trainer
from mmfast.train.finetune import finetune, finetune_config

SMALL = dict(train_size=192, eval_size=48, batch_size=32, warmup_steps=1, eval_every=0, save_every=0,
             log_every=1, progress=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny clip + mlm run folder (two steps: the tasks only need its weights and tokenizer)."""
    out = str(tmp_path_factory.mktemp("pre"))
    Trainer(TrainConfig(out_dir=out, objectives={"clip": 1.0, "mlm": 1.0}, steps=2, **SMALL)).fit()
    return out


def task_trainer(pretrained, tmp_path, task, steps=3, options=None, **fields):
    config = TrainConfig(out_dir=str(tmp_path / task), objectives={task: 1.0}, init_from=pretrained, steps=steps,
                         task_options=options or {}, **{**SMALL, **fields})
    return Trainer(config)


# ---- classification -------------------------------------------------------------------------------
def test_factored_head_is_colour_plus_shape():
    torch.manual_seed(0)
    head = ClassHead(16, "factored")
    x = torch.randn(5, 16)
    logits = head(x)
    z = head.norm(x)
    colour, shape = head.colour(z), head.shape(z)
    assert logits.shape == (5, 18)
    for c in range(18):
        torch.testing.assert_close(logits[:, c], colour[:, c // 3] + shape[:, c % 3])
    assert ClassHead(16, "linear")(x).shape == (5, 18)


def restricted_reference(logits, allowed, labels, eps):
    """Row by row in float64: torch's cross-entropy over the allowed classes only."""
    rows = []
    for x, keep, y in zip(logits.double(), allowed, labels):
        position = int(keep[:y].sum())
        rows.append(F.cross_entropy(x[keep][None], torch.tensor([position]), label_smoothing=eps))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("head", ["factored", "prompts", "linear"])
def test_classify_loss_against_float64(pretrained, tmp_path, head):
    trainer = task_trainer(pretrained, tmp_path, "classify", options={"head": head, "label_smoothing": 0.1})
    task, model = trainer.task, trainer.model
    _, batch = next(trainer.batches(0, 1))
    labels = batch["labels"]
    torch.manual_seed(1)
    parts = task.losses(model, batch)
    torch.manual_seed(1)  # the same dropout masks
    if head == "factored":
        colour, shape = task.head.parts(task.features(model, batch["images"]))
        c, s = labels // 3, labels % 3
        expected = (restricted_reference(colour, task.seen[:, s].T, c, 0.1)
                    + restricted_reference(shape, task.seen[c], s, 0.1))
    else:
        logits = task.logits(model, batch["images"])
        allowed = task.seen.flatten().expand_as(logits) if head == "prompts" else torch.ones_like(logits, dtype=bool)
        expected = restricted_reference(logits, allowed, labels, 0.1)
    loss = sum(parts.values())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for p in model.visual.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # full fine-tuning reaches the tower


def test_factored_softmax_never_sees_a_pair_training_lacks(pretrained, tmp_path):
    """The shape softmax of a red image holds only the shapes training shows in red: no gradient
    teaches the head that red never comes as a triangle."""
    trainer = task_trainer(pretrained, tmp_path, "classify")
    task = trainer.task
    held = torch.tensor([class_index(c, s) for c, s in HELD_OUT])
    assert not task.seen.flatten()[held].any() and task.seen.sum() == 12
    features = torch.randn(6, task.head.norm.normalized_shape[0], requires_grad=True)
    labels = torch.tensor([class_index(c, s) for c, s in [("red", "circle"), ("green", "square")] * 3])
    c, s = labels // 3, labels % 3
    colour, shape = task.head.parts(features)
    colour.retain_grad()
    shape.retain_grad()
    (restricted_cross_entropy(colour, task.seen[:, s].T, c, 0.0)
     + restricted_cross_entropy(shape, task.seen[c], s, 0.0)).backward()
    assert shape.grad[0, SHAPES.index("triangle")] == 0 and colour.grad[0, COLORS.index("magenta")] == 0
    assert shape.grad[0, SHAPES.index("square")] != 0


def test_linear_probe_leaves_the_backbone(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "classify", options={"head": "linear", "freeze_backbone": True})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    head_before = [p.clone() for p in trainer.task.parameters()]
    for _, batch in trainer.batches(0, 2):
        trainer.train_step(batch)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.task.parameters()))
    assert not trainer.model.training  # frozen features: no dropout


def test_few_shot_takes_k_per_class(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "classify", options={"shots": 2})
    data = trainer.train_data
    labels = data.shapes.labels[data.rows]
    assert len(data.rows) == 24 and torch.bincount(labels).max() == 2
    assert len(data) == SMALL["batch_size"]  # cycled to a whole batch


def test_classify_loss_falls(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "classify", options={"head": "linear"}, lr=3e-3)
    _, batch = next(trainer.batches(0, 1))
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]


# ---- retrieval with mined hard negatives ----------------------------------------------------------
def test_mined_negatives_are_the_best_non_matches(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "retrieve", options={"negatives": 3})
    task, model = trainer.task, trainer.model
    mined = task.mine(model)
    # brute force in float64: every pool image scored against every distinct caption
    model.eval()
    with torch.no_grad():
        img = model.encode_image(task.pool.images.float() / 255).double()
        ids, mask = task.tokenizer.encode(task.captions, model.config.text.max_len)
        txt = model.encode_text(ids, mask).double()
    scores = txt @ img.T
    match = task.caption_id[None, :] == torch.arange(len(task.captions))[:, None]
    assert not match.gather(1, mined).any()  # no true match is mined
    best = scores.masked_fill(match, float("-inf")).topk(3, dim=1).values
    torch.testing.assert_close(scores.gather(1, mined), best, rtol=1e-4, atol=1e-4)


def test_bank_excludes_every_match_of_the_batch(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "retrieve", options={"negatives": 4})
    task = trainer.task
    task.prepare(trainer.model, 0)
    _, batch = next(trainer.batches(0, 1))
    bank = task.bank(batch["index"])
    assert len(bank) > 0
    assert not torch.isin(task.caption_id[bank], task.caption_id[batch["index"]]).any()
    assert not torch.isin(bank, batch["index"]).any()


def test_retrieve_without_bank_is_clip_loss(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "retrieve")
    task, model = trainer.task, trainer.model
    model.eval()
    _, batch = next(trainer.batches(0, 1))
    task.mined.copy_(batch["index"][:1].expand_as(task.mined))  # every caption's "negative": a batch image
    assert len(task.bank(batch["index"])) == 0
    parts = task.losses(model, batch)
    img = model.encode_image(batch["images"])
    txt = model.encode_text(batch["ids"], batch["mask"])
    torch.testing.assert_close(sum(parts.values()), clip_loss(img, txt, model.logit_scale.exp()))


def test_retrieve_mines_every_n_steps_and_resumes(pretrained, tmp_path):
    trainer = task_trainer(pretrained, tmp_path, "retrieve", steps=3, options={"mine_every": 2}, save_every=1)
    calls = []
    mine = trainer.task.mine
    trainer.task.mine = lambda model: calls.append(trainer.step) or mine(model)
    trainer.fit(stop_after=3)
    assert calls == [0, 2]
    resumed = Trainer.resume(trainer.config.out_dir, progress=False)
    assert int(resumed.task.mined_at) == 2 and torch.equal(resumed.task.mined, trainer.task.mined)


# ---- plumbing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(objectives={"classify": 1.0, "clip": 1.0}), "trained alone"),
    (dict(objectives={"classify": 1.0}, accum_steps=2), "accum_steps must be 1"),
    (dict(objectives={"clip": 1.0}, task_options={"shots": 1}), "task_options are given"),
    (dict(objectives={"classify": 1.0}, init_from="/no/such/run"), "init_from: no checkpoint"),
])
def test_task_config_errors(fields, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TrainConfig(**fields).validate()


def test_a_task_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match="set init_from"):
        Trainer(TrainConfig(out_dir=str(tmp_path), objectives={"generate": 1.0}, **SMALL))


def test_unknown_or_mistyped_task_option(pretrained, tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        task_trainer(pretrained, tmp_path, "classify", options={"shot": 2})
    with pytest.raises(ValueError, match="shots"):
        task_trainer(pretrained, tmp_path, "classify", options={"shots": "2"})
    with pytest.raises(ValueError, match="unknown task"):
        task_class("segment")


def test_finetune_writes_its_summary(pretrained, tmp_path):
    config = finetune_config("classify", pretrained, str(tmp_path / "ft"), minutes=0.05)
    for k, v in SMALL.items():
        setattr(config, k, v)
    summary = finetune(config, quiet=True)
    with open(tmp_path / "ft" / "summary.json") as f:
        assert json.load(f)["task"] == "classify"
    keys = {r["metric"] for r in summary["metrics"]}
    assert summary["headline"] in keys and all(r["baseline"] is not None for r in summary["metrics"])
    assert os.path.isfile(tmp_path / "ft" / "checkpoint.pt")


def test_finetune_command_line(pretrained, tmp_path, capsys):
    from mmfast.__main__ import main

    assert main(["finetune", "--task", "classify", "--from", "/no/such/run"]) == 2
    assert "--from: no checkpoint" in capsys.readouterr().err
    assert main(["finetune", "--task", "classify", "--from", pretrained, "--option", "shots"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["finetune", "--task", "classify", "--from", pretrained, "--option", "head=lineer"]) == 2
    assert "['head'] must be one of" in capsys.readouterr().err
    out = str(tmp_path / "cli")
    assert main(["finetune", "--task", "classify", "--from", pretrained, "--out", out, "--minutes", "0.02",
                 "--option", "shots=2", "--option", "freeze_backbone=true"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["task_options"] == {"shots": 2, "freeze_backbone": True}
    assert "classify_top1_held_out" in capsys.readouterr().out


def test_generate_command_line(pretrained, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the PNG (without it: the error naming the install, test_generate.py)
    from mmfast.__main__ import main

    run = os.path.join(pretrained, "finetune-generate")  # where `generate --from RUN` looks for its generator
    Trainer(TrainConfig(out_dir=run, objectives={"generate": 1.0}, init_from=pretrained, steps=2,
                        task_options={"width": 16}, **SMALL)).fit()
    png = str(tmp_path / "out.png")
    assert main(["generate", "--from", pretrained, "--prompt", "a large red zebra", "--n", "3", "--out", png]) == 0
    out = capsys.readouterr().out
    assert "['zebra']" in out and "3 images" in out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["generate", "--from", run, "--prompt", "a red circle", "--n", "0", "--out", png]) == 2
