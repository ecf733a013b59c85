"""`python -m mmfast demo`: pretrains a tiny CLIP + masked-LM model on the embedded `shapes` data
within a time budget, and shows what it learned on held-out attribute combinations, before and
after, beside chance; then what the fused losses save against the naive ones at a large batch."""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from mmfast._memory import peak_growth
from mmfast.contrastive import clip_loss
from mmfast.cross_entropy import linear_cross_entropy
from mmfast.tasks import TASKS
from mmfast.train.config import TrainConfig
from mmfast.train.trainer import Trainer

# (label, metric key) of the before/after table.
ROWS = [
    ("zero-shot top-1, 18 colour-shape classes", "zero_shot_top1"),
    ("  on the 6 held-out combinations", "zero_shot_top1_held_out"),
    ("image→text R@1", "image_to_text_R@1"),
    ("image→text R@5", "image_to_text_R@5"),
    ("text→image R@1", "text_to_image_R@1"),
    ("text→image R@5", "text_to_image_R@5"),
    ("masked attribute word, with the image", "mlm_accuracy"),
    ("masked attribute word, blank image", "mlm_accuracy_blank_image"),
]
# The fused-vs-naive table's sizes: a contrastive batch whose N×N logits take 1 GiB in fp32, and
# a BERT vocabulary over 4096 masked tokens (T×V logits: 0.5 GiB).
CLIP_N, CLIP_D = 16384, 64
MLM_T, MLM_V, MLM_DH = 4096, 30522, 128


def demo_config(out_dir: str, minutes: float, seed: int) -> TrainConfig:
    """mlm_prob 0.4, not BERT's 0.15: a caption has only 3 to 9 attribute words (the maskable ones),
    so at 0.15 most batches would hold few masked words for the masked-LM objective."""
    return TrainConfig(out_dir=out_dir, data="shapes", train_size=20000, eval_size=1000, model="tiny",
                       objectives={"clip": 1.0, "mlm": 1.0}, batch_size=128, lr=2e-3, warmup_steps=20,
                       mlm_prob=0.4,
                       max_minutes=minutes, log_every=5, save_every=0, seed=seed)


def table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def steps_within(trainer: Trainer, seconds: float, eval_seconds: float, evals: int) -> int:
    """Training steps that fit in `seconds` with `evals` evaluations: times 4 whole steps (data,
    forward, backward, optimizer; the first a warm-up), then restores the weights, the optimizer
    and the RNG, so training starts from where it was."""
    modules = [m for m in (trainer.model, trainer.task) if m is not None]  # a task's head and buffers too
    optimizer = trainer.optimizer
    saved = copy.deepcopy(([m.state_dict() for m in modules], optimizer.state_dict())), torch.get_rng_state()
    times = []
    start = time.perf_counter()
    for _, batch in trainer.batches(0, 4):
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    (weights, state), rng = saved
    for m, w in zip(modules, weights):
        m.load_state_dict(w)
    optimizer.load_state_dict(state)
    torch.set_rng_state(rng)
    trainer.step = 0
    per_step = 1.1 * statistics.median(times[1:])  # 1.1: logging, progress, a noisy machine
    return max(10, int((seconds - evals * eval_seconds) / per_step))


def fused_vs_naive(repeats: int = 2) -> list:
    """Forward + backward of each fused loss and of its naive form (the full logits), at one large
    size: median time and the peak memory beyond the inputs."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(CLIP_N, CLIP_D, generator=g), dim=1).requires_grad_()
    b = F.normalize(torch.randn(CLIP_N, CLIP_D, generator=g), dim=1).requires_grad_()
    scale, labels = torch.tensor(1 / 0.07), torch.arange(CLIP_N)
    h = torch.randn(MLM_T, MLM_DH, generator=g).requires_grad_()
    w = (torch.randn(MLM_V, MLM_DH, generator=g) / MLM_DH ** 0.5).requires_grad_()
    y = torch.randint(0, MLM_V, (MLM_T,), generator=g)

    def naive_clip():
        logits = scale * a @ b.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    cases = [
        (f"CLIP loss, batch {CLIP_N}, D {CLIP_D}", lambda: clip_loss(a, b, scale), naive_clip, (a, b)),
        (f"masked-LM loss, {MLM_T} tokens, vocabulary {MLM_V}", lambda: linear_cross_entropy(h, w, y),
         lambda: F.cross_entropy(h @ w.T, y), (h, w)),
    ]
    rows = []
    for label, fused, naive, leaves in cases:
        row = {"case": label}
        for name, loss in (("fused", fused), ("naive", naive)):
            def step():
                for t in leaves:
                    t.grad = None
                loss().backward()

            row[f"{name}_extra_mib"] = peak_growth(step) / 2**20  # also the warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            row[f"{name}_seconds"] = statistics.median(times)
        rows.append(row)
    return rows


def run(out_dir: str, minutes: float, seed: int = 0, fused: bool = True, tasks_minutes: Optional[float] = None) -> int:
    """Pretrains in out_dir and prints its tables; with tasks_minutes, then fine-tunes every task
    (mmfast.tasks) on the result, each in OUT_DIR/finetune-TASK, and prints one table of them."""
    start = time.perf_counter()
    pretrain(out_dir, minutes, seed, fused)
    if tasks_minutes is None:
        return 0
    from mmfast.train.finetune import finetune, finetune_config

    rows = []
    for task in TASKS:
        print(f"\n== {task} ({tasks_minutes:g} min of training on the pretrained model)")
        summary = finetune(finetune_config(task, out_dir, minutes=tasks_minutes, seed=seed))
        head = next(r for r in summary["metrics"] if r["metric"] == summary["headline"])
        rows.append({"task": task, **head, "steps": summary["steps"], "train_seconds": summary["train_seconds"]})
    print(f"\nevery task, on held-out combinations (%; {(time.perf_counter() - start) / 60:.1f} min in all)")
    print(table(["task", "metric", "result", "baseline", "chance", "training s"],
                [[r["task"], r["metric"], f"{100 * r['after']:.1f}", f"{100 * r['baseline']:.1f}",
                  f"{100 * r['chance']:.1f}", f"{r['train_seconds']:.0f}"] for r in rows]))
    print("baseline: classify: the zero-shot accuracy of the same checkpoint; retrieve: the checkpoint before\n"
          "fine-tuning; vqa: the most frequent answer of each question type; generate: images drawn from\n"
          "shuffled captions (judged by the pretrained model's zero-shot classifier).")
    with open(os.path.join(out_dir, "tasks.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


def pretrain(out_dir: str, minutes: float, seed: int = 0, fused: bool = True) -> None:
    torch.manual_seed(seed)
    config = demo_config(out_dir, minutes, seed)
    where = "a GPU" if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"mmfast demo: a tiny CLIP + masked-LM model on `shapes` ({config.train_size} training pairs; "
          f"evaluation on {config.eval_size} pairs whose colour–shape combinations training never shows), "
          f"on {where}")
    trainer = Trainer(config)
    chance = trainer.chance()
    start = time.perf_counter()
    before = trainer.evaluate()
    eval_seconds = time.perf_counter() - start
    evals = 3  # during training, besides the final one
    trainer.config.steps = steps_within(trainer, 60 * minutes, eval_seconds, evals + 1)
    trainer.config.eval_every = -(-trainer.config.steps // (evals + 1))  # the last one is fit's final eval
    print(f"training {trainer.config.steps} steps of {config.batch_size} pairs (budget {minutes:g} min)")
    start = time.perf_counter()
    after = trainer.fit()
    train_seconds = time.perf_counter() - start

    records = [{"metric": key, "label": label, "before": before[key], "after": after[key], "chance": chance[key]}
               for label, key in ROWS]
    print("\nheld-out evaluation (%)")
    print(table(["", "before", "after", "chance"],
                [[r["label"], f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}", f"{100 * r['chance']:.1f}"]
                 for r in records]))
    print("chance: a uniform guess (R@k: k/N; zero-shot: 1/18; a masked word: among the words of its kind,\n"
          "colour, shape or size, which the caption alone tells). An untrained model maps every image to nearly\n"
          "one feature and names one class for all: 1/18 on all classes, 0 or 1/6 on the held-out ones.")
    summary = {"metrics": records, "steps": trainer.step, "batch_size": config.batch_size,
               "train_seconds": train_seconds, "config": trainer.config.to_dict()}
    if fused:
        print(f"\nfused losses against the naive ones (forward + backward, {torch.get_num_threads()} threads)")
        rows = fused_vs_naive()
        print(table(["", "fused s", "naive s", "fused extra MiB", "naive extra MiB"],
                    [[r["case"], f"{r['fused_seconds']:.2f}", f"{r['naive_seconds']:.2f}",
                      f"{r['fused_extra_mib']:.0f}", f"{r['naive_extra_mib']:.0f}"] for r in rows]))
        summary["fused_vs_naive"] = rows
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nrun folder: {os.path.abspath(out_dir)} (checkpoint.pt, metrics.jsonl, curves.png, summary.json)")
