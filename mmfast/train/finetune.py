"""`python -m mmfast finetune --task classify|retrieve|vqa|generate --from RUN_DIR`: one task
(mmfast.tasks) trained on a pretrained checkpoint within a time budget by the Trainer, then its
metrics beside their baseline (what a user would otherwise have: zero-shot accuracy, the checkpoint
before fine-tuning, the majority answer, images from shuffled captions) and chance."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from mmfast.tasks import task_class
from mmfast.train import checkpoint
from mmfast.train.config import TrainConfig, checkpoint_path
from mmfast.train.demo import steps_within, table
from mmfast.train.trainer import Trainer


def finetune_config(task: str, source: str, out_dir: Optional[str] = None, minutes: float = 2.0, seed: int = 0,
                    options: Optional[dict] = None) -> TrainConfig:
    """The task's recipe (its suited batch size, lr, ...) on the checkpoint in `source` (a run folder
    or a checkpoint file); out_dir defaults to SOURCE_DIR/finetune-TASK."""
    cls = task_class(task)
    source_dir = source if os.path.isdir(source) else os.path.dirname(checkpoint_path(source, "--from"))
    fields = {"train_size": 20000, "eval_size": 1000, "warmup_steps": 10, "log_every": 5, "eval_every": 0,
              "save_every": 0, **cls.recipe}
    fields.update(objectives={task: 1.0}, init_from=source, task_options=dict(options or {}), max_minutes=minutes,
                  seed=seed, out_dir=out_dir or os.path.join(source_dir, f"finetune-{task}"))
    return TrainConfig(**fields)


def finetune(config: TrainConfig, quiet: bool = False) -> dict:
    """Trains config's task for the steps that fit in config.max_minutes (calibrated on real steps,
    at most config.steps, and stopped at max_minutes) and returns {task, headline, metrics: [{metric, after, baseline,
    chance}], steps, train_seconds}, also written to OUT_DIR/summary.json."""
    trainer = Trainer(config)
    task = trainer.task
    say = (lambda *a: None) if quiet else print
    baseline, chance = task.baseline(trainer.model), task.chance()
    trainer.config.steps = min(config.steps, steps_within(trainer, 60 * config.max_minutes, 0.0, 0))
    say(f"{task.name}: training {trainer.config.steps} steps of {config.batch_size} (budget {config.max_minutes:g} min)")
    start = time.perf_counter()
    after = trainer.fit()
    seconds = time.perf_counter() - start
    records = [{"metric": k, "after": v, "baseline": baseline.get(k), "chance": chance.get(k)} for k, v in after.items()]
    say(table(["", "after", "baseline", "chance"],
              [[r["metric"], *(f"{100 * r[c]:.1f}" if r[c] is not None else "-" for c in ("after", "baseline", "chance"))]
               for r in records]))
    summary = {"task": task.name, "headline": task.headline, "metrics": records, "steps": trainer.step,
               "train_seconds": seconds, "baseline_only": {k: v for k, v in baseline.items() if k not in after},
               "config": trainer.config.to_dict()}
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    say(f"run folder: {os.path.abspath(config.out_dir)}")
    return summary


def generator_run(source: str) -> str:
    """The run folder of a text-to-image generator: `source` itself if it is one, else its
    finetune-generate folder, trained now (the task's default budget) if it is not there yet."""
    path = checkpoint_path(source, "--from")
    if "generate" in checkpoint.load(path)["config"]["objectives"]:
        return os.path.dirname(path)
    run = os.path.join(os.path.dirname(path), "finetune-generate")
    if not os.path.isfile(os.path.join(run, "checkpoint.pt")):
        print(f"{source} holds no generator: training one into {run} first")
        finetune(finetune_config("generate", path, run))
    return run


def generate(source: str, prompt: str, n: int, out: str, seed: int = 0) -> int:
    """Draws n images for `prompt` with the generator of `source` (generator_run) into the PNG `out`."""
    from mmfast.tasks.generate import save_grid

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    trainer = Trainer.resume(generator_run(source), progress=False)
    unknown = [w for w in trainer.tokenizer.split(prompt) if w not in trainer.tokenizer.ids]
    if unknown:
        print(f"warning: the model does not know the words {unknown}; it reads them as [UNK]")
    images = trainer.task.generate(trainer.model, [prompt] * n, seed=seed)
    save_grid(images, [f"{prompt} ({i + 1})" for i in range(n)], out)
    print(f"wrote {os.path.abspath(out)} ({n} images of {prompt!r})")
    return 0
