"""What every task shares: the Task contract the Trainer's one loop drives, option checking, and the
zero-shot classifier of a checkpoint (the baseline of classification, the judge of generation)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from mmfast.data import SHAPES, TEMPLATES, Shapes, Tokenizer
from mmfast.eval import zero_shot_classifier
from mmfast.similarity import topk_similarity

# Evaluation batch: forward passes only.
EVAL_BATCH = 500


class Task(nn.Module):
    """A head and an objective on a pretrained CLIPModel. The Trainer (mmfast.train) builds it from
    TrainConfig (objectives = {task name: weight}, task_options = this task's options), adds its
    parameters to the optimizer, saves its state_dict in the checkpoint, and per step calls

        prepare(model, step)              (e.g. mine hard negatives every N steps)
        losses(model, batch) → {part: scalar}   the step's loss is their sum times the weight

    on batches collate(items) of train_data() items (a dict of tensors, moved to the device).
    evaluate(model), baseline(model) and chance() give {metric: fraction}: the metric now, what a
    user judges it against (computed on the starting checkpoint), and a uniform guess.

    Class attributes: name (the objective's name), headline (the metric `demo --all` reports),
    defaults (option name → default value; a given option must have the default's type).
    """
    name = ""
    headline = ""
    defaults: dict = {}
    # True: the CLIPModel's weights stay as pretrained (requires_grad off, eval mode: no dropout)
    frozen_backbone = False
    # TrainConfig values that suit the task: `python -m mmfast finetune` starts from them
    recipe: dict = {}
    # AdamW's betas for this task's run
    betas = (0.9, 0.999)

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config, device: torch.device,
                 autocast: Optional[Callable] = None, options: Optional[dict] = None):
        super().__init__()
        self.tokenizer, self.config, self.device = tokenizer, config, device
        self.autocast = autocast or contextlib.nullcontext
        self.options = self.check_options(options or {})

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """The defaults updated with options; an unknown name or a wrong type raises ValueError."""
        if not isinstance(options, dict):
            raise ValueError(f"task_options must be a dict, got {options!r}")
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise ValueError(f"task_options: unknown option(s) {unknown} for task {cls.name!r}; "
                             f"its options are {sorted(cls.defaults)}")
        out = dict(cls.defaults)
        for key, value in options.items():
            default = cls.defaults[key]
            kinds = (int, float) if isinstance(default, float) else type(default)
            if default is not None and (not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool)):
                raise ValueError(f"task_options[{key!r}] must be {type(default).__name__}, got {value!r}")
            out[key] = value
        return out

    def train_data(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def prepare(self, model: nn.Module, step: int) -> None:
        """Called before each training step; nothing by default."""

    def losses(self, model: nn.Module, batch: dict) -> dict:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def baseline(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def chance(self) -> dict:
        raise NotImplementedError

    def image_size(self, model: nn.Module) -> int:
        return model.config.image.image_size


class ZeroShot:
    """The zero-shot classifier of a CLIPModel over the 18 `shapes` classes ("red circle", …):
    predict(images (N, C, H, W)) → (N,) class indices (class = colour · 3 + shape)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device, autocast: Callable = contextlib.nullcontext):
        self.model, self.device, self.autocast = model, device, autocast

        def encode(prompts):
            ids, mask = tokenizer.encode(prompts, model.config.text.max_len)
            with torch.no_grad(), autocast():
                return model.encode_text(ids.to(device), mask.to(device)).float()

        with eval_mode(model):
            self.classes = zero_shot_classifier(encode, Shapes.classnames(), TEMPLATES)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        out = []
        with eval_mode(self.model):
            for chunk in images.split(EVAL_BATCH):
                with self.autocast():
                    feats = self.model.encode_image(chunk.to(self.device)).float()
                out.append(topk_similarity(feats, self.classes, 1)[1][:, 0])
        return torch.cat(out).cpu()

    @staticmethod
    def colour_and_shape(classes: Tensor) -> tuple[Tensor, Tensor]:
        """Class indices → (colour indices into COLORS, shape indices into SHAPES)."""
        return classes // len(SHAPES), classes % len(SHAPES)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
