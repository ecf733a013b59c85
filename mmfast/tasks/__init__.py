"""Fine-tuning and generation on a pretrained CLIPModel (design.md §5): each task is a head and an
objective that mmfast.train.Trainer trains in its one loop.

    classify   a head on the image features, cross-entropy (mmfast.cross_entropy)
    retrieve   the contrastive loss plus hard negatives mined with mmfast.topk_similarity
    vqa        an answer decoder on the fusion encoder, seq2seq loss (mmfast.linear_cross_entropy)
    generate   a text-conditioned GAN judged by the checkpoint's zero-shot classifier

    TrainConfig(objectives={"classify": 1.0}, init_from="runs/demo", task_options={"shots": 8})
"""
from __future__ import annotations

import importlib

from mmfast.tasks.base import Task, ZeroShot

# name → "module:class", imported when used (a task's module may pull in what only it needs)
TASKS = {
    "classify": "mmfast.tasks.classify:Classify",
    "retrieve": "mmfast.tasks.retrieve:Retrieve",
    "vqa": "mmfast.tasks.vqa:VQA",
    "generate": "mmfast.tasks.generate:Generate",
}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["TASKS", "Task", "ZeroShot", "task_class"]
