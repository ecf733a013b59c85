"""TrainConfig: everything a run needs, as one dataclass that round-trips through JSON
(`python -m mmfast train --config cfg.json`). Bad values fail at start, naming the field."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

# Objectives by name. "batch" objectives compare every image with every caption of the batch, so
# feature-cached accumulation computes them once on the whole batch; "sample" objectives are sums
# over samples, computed per micro-batch; a "task" (mmfast.tasks: a head, its data and its
# evaluation, usually on a pretrained checkpoint, init_from) is trained alone.
OBJECTIVES = {"clip": "batch", "siglip": "batch", "mlm": "sample",
              "classify": "task", "retrieve": "task", "vqa": "task", "generate": "task"}
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    out_dir: str = "runs/mmfast"
    # "shapes" (the embedded dataset: its train split, held-out combinations for evaluation) or a
    # .jsonl/.csv of (image path, caption) records; eval_data: a second such file (None: no eval).
    data: str = "shapes"
    eval_data: Optional[str] = None
    train_size: int = 20000  # shapes only
    eval_size: int = 1000  # shapes only: held-out pairs drawn (one kept per distinct caption), zero-shot images
    # a preset of mmfast.models.ModelConfig ("tiny", "base"), or its fields as a nested dict; the
    # image size and the longest caption come from it (image.image_size, text.max_len)
    model: Union[str, dict] = "tiny"
    objectives: dict = field(default_factory=lambda: {"clip": 1.0, "mlm": 1.0})
    # a checkpoint (or a run folder holding checkpoint.pt) whose model and tokenizer the run starts
    # from (fine-tuning); its optimizer state and step are not taken
    init_from: Optional[str] = None
    task_options: dict = field(default_factory=dict)  # a task objective's options (mmfast.tasks: each task's defaults)
    steps: int = 1000
    max_minutes: Optional[float] = None  # stop (and checkpoint) at this wall time even before `steps`
    batch_size: int = 256
    accum_steps: int = 1  # micro-batches per step, with the contrastive loss on the whole batch
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    grad_clip: Optional[float] = 1.0  # max global gradient norm (None: no clipping)
    mlm_prob: float = 0.15
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, fp32 elsewhere
    backend: Optional[str] = None  # mmfast backend of the losses (None: by device)
    # under torchrun: how the contrastive losses see every rank's features (mmfast.distributed):
    # "ring" (flat memory) or "gather" (open_clip's all-gather), both local_loss + gather_with_grad
    distributed: str = "ring"
    device: str = "auto"
    eval_every: int = 200
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    workers: int = 0  # DataLoader worker processes (images decoded by Pillow benefit)
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; the fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"config {path!r} is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {path!r} must hold a JSON object of fields")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Raises ValueError/FileNotFoundError naming the first bad field; returns self."""
        if not isinstance(self.objectives, dict) or not self.objectives:
            raise ValueError(f"objectives must be a non-empty {{name: weight}} dict, got {self.objectives!r}")
        for name, weight in self.objectives.items():
            if name not in OBJECTIVES:
                raise ValueError(f"objectives: unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"objectives[{name!r}] must be a finite weight > 0, got {weight!r}")
        tasks = [name for name in self.objectives if OBJECTIVES[name] == "task"]
        if tasks and len(self.objectives) > 1:
            raise ValueError(f"objectives: the task {tasks[0]!r} is trained alone, got {sorted(self.objectives)}")
        if tasks and self.data != "shapes":
            raise ValueError(f"objectives: the task {tasks[0]!r} runs on data='shapes' (its questions, labels and "
                             f"held-out classes come from it), got data={self.data!r}")
        if tasks and self.accum_steps != 1:
            raise ValueError(f"accum_steps must be 1 for the task {tasks[0]!r} (accumulation serves the "
                             f"contrastive pretraining objectives), got {self.accum_steps}")
        if not isinstance(self.task_options, dict):
            raise ValueError(f"task_options must be a dict of a task's options, got {self.task_options!r}")
        if self.task_options and not tasks:
            raise ValueError("task_options are given but objectives hold no task (classify, retrieve, vqa, generate)")
        if self.init_from is not None:
            checkpoint_path(self.init_from, "init_from")
        for name in ("lr", "weight_decay", "min_lr_ratio", "mlm_prob"):
            if not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.mlm_prob <= 1:
            raise ValueError(f"mlm_prob must be in (0, 1], got {self.mlm_prob}")
        for name, low in (("steps", 1), ("batch_size", 2), ("accum_steps", 1), ("warmup_steps", 0),
                          ("eval_every", 0), ("log_every", 1), ("save_every", 0), ("train_size", 2),
                          ("eval_size", 2), ("workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accum_steps ({self.accum_steps})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.distributed not in ("ring", "gather"):
            raise ValueError(f"distributed must be 'ring' or 'gather', got {self.distributed!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is None or (name == "data" and path == "shapes"):
                continue
            if not isinstance(path, str) or not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: no such file {path!r} (expected 'shapes' or a .jsonl/.csv file)")
        if self.data == "shapes" and self.eval_data is not None:
            raise ValueError("eval_data must be null when data is 'shapes' (its held-out split is the eval set)")
        if not isinstance(self.model, (str, dict)):
            raise ValueError(f"model must be a preset name or a dict of ModelConfig fields, got {self.model!r}")
        return self

    @property
    def task(self) -> Optional[str]:
        """The task objective's name, or None for pretraining."""
        return next((name for name in self.objectives if OBJECTIVES.get(name) == "task"), None)


def checkpoint_path(path: str, what: str = "path") -> str:
    """A checkpoint file, or a run folder's checkpoint.pt; FileNotFoundError naming `what` otherwise."""
    candidate = os.path.join(path, "checkpoint.pt") if isinstance(path, str) and os.path.isdir(path) else path
    if not isinstance(candidate, str) or not os.path.isfile(candidate):
        raise FileNotFoundError(f"{what}: no checkpoint at {path!r} (expected a checkpoint file or a run folder "
                                f"holding checkpoint.pt)")
    return candidate
