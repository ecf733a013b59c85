"""mmfast.train: feature-cached accumulation equals the full batch, a short run learns, stop and
resume ends where an uninterrupted run does, atomic checkpoints, bad configs, the CLI's exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from mmfast.data import Shapes, Tokenizer
from mmfast.models import CLIPModel, ModelConfig
from mmfast.train import TrainConfig, Trainer, checkpoint
from tests.helpers import rel_err

VOCAB = Tokenizer(Shapes.vocabulary()).vocab_size


def small_model(dropout: float = 0.0, fusion: bool = True) -> dict:
    blocks = {"width": 32, "depth": 1, "heads": 2, "embed_dim": 16, "dropout": dropout}
    return {"image": {**blocks, "patch_size": 8}, "text": {**blocks, "vocab_size": VOCAB, "max_len": 24},
            "fusion": {"depth": 1, "heads": 2, "dropout": dropout} if fusion else None}


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), model=small_model(), train_size=256, eval_size=64, batch_size=32,
                steps=6, warmup_steps=2, eval_every=0, log_every=2, save_every=0, progress=False)
    return TrainConfig(**{**base, **kw})


def grads(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objectives, model", [
    ({"clip": 1.0, "mlm": 0.5}, small_model()),
    ({"siglip": 1.0}, {**small_model(fusion=False), "logit_bias": True}),
    ({"clip": 1.0, "siglip": 0.5, "mlm": 2.0}, {**small_model(), "logit_bias": True}),
])
def test_feature_cached_accumulation_equals_the_full_batch(tmp_path, objectives, model):
    """fp32: the loss and every parameter's gradient within 1e-5 relative of the single full batch."""
    out = []
    for accum in (1, 4):
        torch.manual_seed(0)
        trainer = Trainer(config(tmp_path, objectives=objectives, model=model, accum_steps=accum, mlm_prob=0.3))
        batch = next(iter(trainer.batches(0, 1)))[1]
        out.append((trainer.backward(batch), grads(trainer.model)))
    (full_loss, full), (acc_loss, acc) = out
    assert full.keys() == acc.keys() and len(full) == sum(1 for _ in trainer.model.parameters())
    for key in full_loss:
        assert abs(full_loss[key] - acc_loss[key]) <= 1e-5 * abs(full_loss[key]), key
    for name in full:
        assert rel_err(acc[name], full[name], floor=1e-12) < 1e-5, name


def test_accumulation_reruns_each_micro_batch_under_its_first_pass_rng(tmp_path):
    """With dropout, each micro-batch's second pass must draw its first pass's masks: the gradients
    equal those of the contrastive loss on the features of micro-batch forwards with a graph, run
    one after the other from the same RNG state."""
    torch.manual_seed(0)
    trainer = Trainer(config(tmp_path, objectives={"clip": 1.0}, accum_steps=4, model=small_model(0.3, False)))
    batch = next(iter(trainer.batches(0, 1)))[1]
    state = torch.get_rng_state()
    trainer.backward(batch)
    cached = grads(trainer.model)
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    img, txt = zip(*[trainer._features(mb)[:2] for mb in batch.split(4)])
    sum(trainer._contrastive(torch.cat(img), torch.cat(txt)).values()).backward()
    for name, g in grads(trainer.model).items():
        assert rel_err(cached[name], g, floor=1e-12) < 1e-5, name
    torch.manual_seed(1)  # and a different RNG state gives other masks: the comparison can fail
    trainer.optimizer.zero_grad(set_to_none=True)
    img, txt = zip(*[trainer._features(mb)[:2] for mb in batch.split(4)])
    sum(trainer._contrastive(torch.cat(img), torch.cat(txt)).values()).backward()
    assert rel_err(cached["visual.proj.weight"], trainer.model.visual.proj.weight.grad) > 1e-3


def test_a_short_run_learns_and_writes_its_folder(tmp_path):
    torch.manual_seed(0)
    c = config(tmp_path, steps=40, train_size=1024, batch_size=64, lr=3e-3, eval_every=20, warmup_steps=5,
               log_every=5)
    metrics = Trainer(c).fit()
    rows = [json.loads(line) for line in open(os.path.join(c.out_dir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"loss_clip", "loss_mlm", "lr", "samples_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "eval" in r] == [20, 40]
    assert {"text_to_image_R@5", "zero_shot_top1", "zero_shot_top1_held_out", "mlm_accuracy",
            "mlm_accuracy_blank_image"} <= metrics.keys()
    assert os.path.isfile(os.path.join(c.out_dir, "checkpoint.pt"))
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(c.out_dir, "curves.png")) > 1000


def test_stop_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    whole = Trainer(config(tmp_path / "a", model=small_model(0.1)))
    whole.fit()
    torch.manual_seed(0)
    part = Trainer(config(tmp_path / "b", model=small_model(0.1)))
    part.fit(stop_after=3)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG it starts with
    resumed = Trainer.resume(str(tmp_path / "b" / "run"))
    assert resumed.step == 3
    resumed.fit()
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    rows = [json.loads(line) for line in open(resumed.metrics_path)]
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 6]  # log_every=2; the stop at 3 logged once
    assert [r["step"] for r in rows if "eval" in r] == [3, 6]


def test_checkpoints_are_atomic_and_load_without_pickled_code(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    checkpoint.save({"w": torch.ones(3), "step": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        checkpoint.save({"w": torch.zeros(3), "step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1 and os.listdir(tmp_path) == ["ck.pt"]
    checkpoint.save({"obj": nn.Linear(2, 2)}, path)  # a pickled module: refused by weights_only
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        checkpoint.load(path)


@pytest.mark.parametrize("change, error, match", [
    (dict(objectives={"contrastive": 1.0}), ValueError, "objectives: unknown objective 'contrastive'"),
    (dict(objectives={"clip": 0.0}), ValueError, r"objectives\['clip'\]"),
    (dict(lr=0.0), ValueError, "lr must be > 0"),
    (dict(lr=-1e-3), ValueError, "lr must be > 0"),
    (dict(data="/no/such/pairs.jsonl"), FileNotFoundError, "data: no such file"),
    (dict(batch_size=30, accum_steps=4), ValueError, "batch_size .* multiple of accum_steps"),
    (dict(precision="fp8"), ValueError, "precision"),
    (dict(model="huge"), ValueError, "preset"),
    (dict(model={**small_model(), "text": {"vocab_size": 7}}), ValueError, "model.text.vocab_size"),
    (dict(model={**small_model(), "image": {"widht": 8}}), ValueError, r"model.image: unknown field\(s\) \['widht'\]"),
    (dict(model=small_model(fusion=False)), ValueError, "'mlm' needs a model with a fusion encoder"),
    (dict(objectives={"siglip": 1.0}, model=small_model()), ValueError, "'siglip' needs a model with a logit_bias"),
])
def test_bad_configs_fail_at_start_naming_the_field(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        Trainer(config(tmp_path, **change))


def test_unknown_config_fields_and_a_tower_of_another_width_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    mc = ModelConfig.from_dict(small_model())

    class Wide(nn.Module):  # the tower protocol, with features of width 24 instead of 16
        config = mc.image

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 32 * 32, 24)

        def forward(self, images):
            return self.proj(images.flatten(1)), images.new_zeros(images.shape[0], 4, 32)

    model = CLIPModel(mc, image_tower=Wide())
    with pytest.raises(ValueError, match="image_tower returns features of width 24 but text_tower of width 16"):
        Trainer(config(tmp_path), model=model)


def run_cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "mmfast", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_train_resume_and_exit_codes(tmp_path):
    cfg = config(tmp_path, steps=4).to_dict()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = run_cli("train", "--config", str(path), "--steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoint.load(os.path.join(cfg["out_dir"], "checkpoint.pt"))["step"] == 2
    out = run_cli("train", "--resume", cfg["out_dir"], "--steps", "4")  # a finished run, extended
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoint.load(os.path.join(cfg["out_dir"], "checkpoint.pt"))["step"] == 4
    path.write_text(json.dumps({**cfg, "lr": 0}))
    out = run_cli("train", "--config", str(path))
    assert out.returncode == 2 and "lr must be > 0" in out.stderr
    out = run_cli("train", "--config", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "missing.json" in out.stderr
    out = run_cli("train", "--resume", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "no checkpoint" in out.stderr
    assert run_cli("train").returncode == 2  # argparse: --config or --resume is required


def test_cli_demo_writes_its_summary(tmp_path):
    out = run_cli("demo", "--out", str(tmp_path / "demo"), "--minutes", "0.05", "--no-fused-table")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.load(open(tmp_path / "demo" / "summary.json"))
    keys = {r["metric"] for r in summary["metrics"]}
    assert {"zero_shot_top1", "text_to_image_R@5", "mlm_accuracy", "mlm_accuracy_blank_image"} <= keys
    for r in summary["metrics"]:
        assert 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1 and 0 < r["chance"] < 1
    assert "held-out evaluation" in out.stdout and "run folder:" in out.stdout
    assert run_cli("demo", "--minutes", "0").returncode == 2


def test_training_on_a_jsonl_of_image_files(tmp_path):
    """The `train on your data` path: Pillow-read images, a vocabulary from the captions, an eval file."""
    pil = pytest.importorskip("PIL.Image")
    shapes = Shapes("train", 48, image_size=32)
    for name, rows in (("train.jsonl", range(40)), ("val.jsonl", range(40, 48))):
        with open(tmp_path / name, "w") as f:
            for i in rows:
                pil.fromarray(shapes.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
                f.write(json.dumps({"image": f"{i}.png", "caption": shapes.captions[i]}) + "\n")
    model = {k: v for k, v in small_model().items()}
    model["text"] = {k: v for k, v in model["text"].items() if k != "vocab_size"}  # from the captions
    c = config(tmp_path, data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "val.jsonl"), model=model,
               batch_size=8, steps=3)
    trainer = Trainer(c)
    assert trainer.tokenizer.vocab_size == trainer.model.config.text.vocab_size
    metrics = trainer.fit()
    assert {"text_to_image_R@1", "mlm_accuracy"} <= metrics.keys() and "zero_shot_top1" not in metrics


ACCUM_SCRIPT = """
from mmfast.train import TrainConfig, Trainer
import tempfile
batch, accum = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
trainer = Trainer(TrainConfig(out_dir=tempfile.mkdtemp(), batch_size=batch, accum_steps=accum, train_size=batch,
                              eval_size=16, progress=False))
data = next(iter(trainer.batches(0, 1)))[1]
def warm():
    trainer.backward(data.split(batch // (4 * accum))[0])
    trainer.optimizer.zero_grad(set_to_none=True)
def step():
    trainer.backward(data)
"""


@pytest.mark.slow
def test_accumulation_holds_one_micro_batch_of_activations():
    """The tiny model, clip + mlm, batch 1024: accum_steps=8 peaks at most at 1/4 of the memory of
    the unaccumulated step (benchmarks/bench_accumulation.py measures batch 4096: 0.12)."""
    from tests.helpers import peak_growth_in_subprocess

    whole = peak_growth_in_subprocess(ACCUM_SCRIPT, 1024, 1)
    accumulated = peak_growth_in_subprocess(ACCUM_SCRIPT, 1024, 8)
    assert accumulated < whole / 4, (accumulated, whole)


def test_bf16_autocast_on_cpu_trains_and_accumulates(tmp_path):
    """precision bf16 (autocast; the MLM head follows it as an nn.Linear would): the cached
    accumulation agrees with the full batch within bf16 rounding."""
    out = []
    for accum in (1, 4):
        torch.manual_seed(0)
        trainer = Trainer(config(tmp_path, precision="bf16", accum_steps=accum, mlm_prob=0.3))
        batch = next(iter(trainer.batches(0, 1)))[1]
        out.append((trainer.backward(batch), grads(trainer.model)))
    (full_loss, full), (acc_loss, acc) = out
    assert abs(full_loss["loss"] - acc_loss["loss"]) < 2e-2 * full_loss["loss"]
    assert max(rel_err(acc[n], full[n], floor=1e-12) for n in full) < 5e-2


def test_steps_with_nothing_to_learn_do_not_fail(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(config(tmp_path, objectives={"mlm": 1.0}, accum_steps=4, mlm_prob=0.3))
    batch = next(iter(trainer.batches(0, 1)))[1]
    batch.mlm_labels[:] = -100  # no masked word in the batch
    assert trainer.backward(batch) == {"loss_mlm": 0.0, "loss": 0.0}
    trainer = Trainer(config(tmp_path, objectives={"clip": 1.0, "mlm": 1.0}, accum_steps=4))
    for p in [*trainer.model.visual.parameters(), *trainer.model.text.parameters()]:
        p.requires_grad_(False)  # both towers frozen: only the scale learns
    batch = next(iter(trainer.batches(0, 1)))[1]
    batch.mlm_labels[:] = -100
    losses = trainer.backward(batch)
    assert losses["loss_mlm"] == 0.0 and trainer.model.logit_scale.grad is not None


def test_ctrl_c_saves_the_last_whole_step_and_exits_130(tmp_path):
    cfg = config(tmp_path, steps=10_000, log_every=1).to_dict()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "mmfast", "train", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    metrics = os.path.join(cfg["out_dir"], "metrics.jsonl")
    deadline = time.monotonic() + 60
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    step = checkpoint.load(os.path.join(cfg["out_dir"], "checkpoint.pt"))["step"]
    assert step >= 1 and f"interrupted: checkpoint of step {step}" in err
    resumed = Trainer.resume(cfg["out_dir"], steps=step + 1)
    assert resumed.step == step
