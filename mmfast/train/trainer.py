"""Trainer: one loop for joint contrastive + masked-LM pretraining over mmfast's fused losses.

    trainer = Trainer(TrainConfig(objectives={"clip": 1.0, "mlm": 1.0}, steps=500, out_dir="runs/a"))
    metrics = trainer.fit()            # writes runs/a/{checkpoint.pt, metrics.jsonl, curves.png}
    trainer = Trainer.resume("runs/a") # continues where the checkpoint stopped

Large contrastive batches on small memory (accum_steps = k, open_clip's accum_freq): the features
of all k micro-batches are computed first without a graph, the contrastive loss and its feature
gradients on the whole batch (the fused op holds no B×B matrix), then each micro-batch is run again
with a graph, under the RNG state of its first pass so that dropout draws the same masks, and its
features are backpropagated with their cached gradients, together with its share of the per-sample
objectives (masked LM). Loss and gradients are those of the single full batch; the graph held at any
time is one micro-batch's.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.contrastive import clip_loss, siglip_loss
from mmfast.data import COLORS, SHAPES, SIZES, TEMPLATES, Shapes, Tokenizer
from mmfast.models import CLIPModel, ModelConfig
from mmfast.train import checkpoint
from mmfast.train.config import OBJECTIVES, TrainConfig
from mmfast.train.data import Batch, StepOrder, build_batch, datasets, loader, tokenizer_for
from mmfast.train.evaluate import EvalSet, chance, evaluate
from mmfast.train.plot import plot_run

# The whole-batch objectives: (image features (B, E), text features (B, E), scale, bias, backend) → loss.
BATCH_LOSSES = {
    "clip": lambda a, b, scale, bias, backend: clip_loss(a, b, scale, backend=backend),
    "siglip": lambda a, b, scale, bias, backend: siglip_loss(a, b, scale, bias, backend=backend),
}


def model_config(config: TrainConfig) -> ModelConfig:
    """The config's ModelConfig; a preset gets the objectives' branches (the fusion encoder only
    with mlm, SigLIP's bias only with siglip). Its vocab_size is set from the tokenizer later."""
    if not isinstance(config.model, str):
        return ModelConfig.from_dict(config.model)
    mc = ModelConfig.preset(config.model, vocab_size=1)
    mc.logit_bias = "siglip" in config.objectives
    if "mlm" not in config.objectives:
        mc.fusion = None
    return mc


def shapes_eval_set(pairs, zero_shot) -> EvalSet:
    return EvalSet(pairs, zero_shot, Shapes.classnames(), TEMPLATES, (COLORS, SHAPES, SIZES))


class Trainer:
    """config: a TrainConfig (validated here). model, tokenizer, train_data, eval_data: stand-ins for
    what the config would build (train_data: a dataset of (image (C, H, W), caption) with
    `captions`; eval_data: an EvalSet or None); a user's CLIPModel may carry its own towers."""

    def __init__(self, config: TrainConfig, *, model: Optional[nn.Module] = None,
                 tokenizer: Optional[Tokenizer] = None, train_data=None, eval_data: Optional[EvalSet] = None):
        c = self.config = config.validate()
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=bf16)
        torch.manual_seed(c.seed)
        mc = model.config if model is not None else model_config(c)
        if train_data is None:
            train_data, pairs, zero_shot = datasets(c.data, c.eval_data, c.train_size, c.eval_size,
                                                    mc.image.image_size, c.seed)
            if eval_data is None and pairs is not None:
                eval_data = shapes_eval_set(pairs, zero_shot) if c.data == "shapes" else EvalSet(pairs)
        self.train_data, self.eval_data = train_data, eval_data
        self.tokenizer = tokenizer or tokenizer_for(c.data, train_data)
        if model is None:
            if isinstance(c.model, str) or "vocab_size" not in (c.model.get("text") or {}):
                mc.text.vocab_size = self.tokenizer.vocab_size
            elif mc.text.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"model.text.vocab_size ({mc.text.vocab_size}) must equal the tokenizer's "
                                 f"vocabulary size ({self.tokenizer.vocab_size})")
            model = CLIPModel(mc)
        self.model = model.to(self.device)
        self.objectives = dict(c.objectives)
        self.batch_objectives = {k: w for k, w in self.objectives.items() if OBJECTIVES[k] == "batch"}
        self._check_model()
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms, scale
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
        self.step = 0
        self.metrics_path = os.path.join(c.out_dir, "metrics.jsonl")
        self.checkpoint_path = os.path.join(c.out_dir, "checkpoint.pt")
        self.last_eval: dict = {}

    # ---- set-up checks ---------------------------------------------------------------------------
    def _check_model(self) -> None:
        model = self.model
        if "mlm" in self.objectives and getattr(model, "fusion", None) is None:
            raise ValueError("objectives: 'mlm' needs a model with a fusion encoder (model.fusion is None)")
        if "siglip" in self.objectives and getattr(model, "logit_bias", None) is None:
            raise ValueError("objectives: 'siglip' needs a model with a logit_bias (ModelConfig.logit_bias=True)")
        images = torch.stack([self.train_data[i][0] for i in range(2)]).to(self.device)
        ids, mask = self.tokenizer.encode([self.train_data.captions[i] for i in range(2)], model.config.text.max_len)
        with torch.no_grad():
            a, _ = model.visual(images)
            b, _ = model.text(ids.to(self.device), mask.to(self.device))
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"image_tower returns features of width {a.shape[-1]} but text_tower of width "
                             f"{b.shape[-1]}: the contrastive losses need equal widths (project one of them)")

    # ---- one step --------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warmup to lr over warmup_steps, then a cosine to lr · min_lr_ratio at `steps`."""
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def _contrastive(self, img: Tensor, txt: Tensor) -> dict:
        model, backend = self.model, self.config.backend
        scale = model.logit_scale.exp()
        return {name: BATCH_LOSSES[name](img, txt, scale, model.logit_bias, backend)
                for name in self.batch_objectives}

    def _features(self, mb: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image features (b, E), normalised text features (b, E), patches (b, P, width))."""
        pooled, patches = self.model.visual(mb.images)
        text, _ = self.model.text(mb.ids, mb.mask)
        return F.normalize(pooled, dim=-1), F.normalize(text, dim=-1), patches

    def backward(self, batch: Batch) -> dict:
        """Accumulates the gradients of the batch's weighted loss into .grad (in accum_steps
        micro-batches) and returns the batch's loss values as floats."""
        k = self.config.accum_steps
        micro = batch.split(k)
        losses: dict = {}
        cached = None
        if self.batch_objectives and k > 1:
            rng, img, txt = [], [], []
            with torch.no_grad(), self.autocast():
                for mb in micro:
                    rng.append(_rng_state())
                    i, t, _ = self._features(mb)
                    img.append(i)
                    txt.append(t)
            img = torch.cat(img).detach().requires_grad_()
            txt = torch.cat(txt).detach().requires_grad_()
            with self.autocast():
                parts = self._contrastive(img, txt)
            sum(self.objectives[n] * v for n, v in parts.items()).backward()
            losses.update({n: float(v.detach()) for n, v in parts.items()})
            cached = list(zip(rng, img.grad.float().chunk(k), txt.grad.float().chunk(k)))
        masked_total = batch.masked_tokens if "mlm" in self.objectives else 0
        mlm = 0.0
        for j, mb in enumerate(micro):
            if cached:
                _set_rng_state(cached[j][0])
            with self.autocast():
                img, txt, patches = self._features(mb)
                total = img.new_zeros((), dtype=torch.float32)
                if cached:
                    total = total + (img.float() * cached[j][1]).sum() + (txt.float() * cached[j][2]).sum()
                elif self.batch_objectives:
                    parts = self._contrastive(img, txt)
                    total = total + sum(self.objectives[n] * v for n, v in parts.items())
                    losses.update({n: float(v.detach()) for n, v in parts.items()})
                count = mb.masked_tokens if masked_total else 0
                if count:
                    _, hidden = self.model.text(mb.mlm_ids, mb.mask)
                    part = self.model.fusion(hidden, patches, mb.mlm_labels, mb.mask) * (count / masked_total)
                    total = total + self.objectives["mlm"] * part
                    mlm += float(part.detach())
            total.backward()
        if masked_total:
            losses["mlm"] = mlm
        losses = {f"loss_{n}": v for n, v in losses.items()}
        losses["loss"] = sum(self.objectives[n[5:]] * v for n, v in losses.items())
        return losses

    def train_step(self, batch: Batch) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        losses = self.backward(batch)
        if self.config.grad_clip is not None:
            losses["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        self.step += 1
        return losses

    # ---- the loop --------------------------------------------------------------------------------
    def batches(self, start: int, stop: int):
        """(step, Batch on the device) for steps start..stop-1, a function of (seed, step) alone."""
        c = self.config
        order = StepOrder(len(self.train_data), c.batch_size, c.seed, start, stop)
        mlm_prob = c.mlm_prob if "mlm" in self.objectives else None
        for step, (images, captions) in enumerate(loader(self.train_data, order, c.workers), start):
            generator = torch.Generator().manual_seed(c.seed * 7_919 + step)  # the step's MLM masks
            batch = build_batch(images, captions, self.tokenizer, self.model.config.text.max_len, mlm_prob, generator)
            yield step, batch.to(self.device)

    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Trains to config.steps (or stop_after steps, or max_minutes), evaluating every eval_every
        steps and at the end, checkpointing every save_every steps and at the end. Returns the last
        evaluation's metrics ({} without eval data)."""
        c = self.config
        stop = c.steps if stop_after is None else min(c.steps, stop_after)
        os.makedirs(c.out_dir, exist_ok=True)
        if self.step == 0:
            open(self.metrics_path, "w").close()
        deadline = None if c.max_minutes is None else time.monotonic() + 60 * c.max_minutes
        bar = _progress(c, self.step)
        window, tick = [], time.perf_counter()
        try:
            for step, batch in self.batches(self.step, stop):
                losses = self.train_step(batch)
                window.append(losses)
                now = time.perf_counter()
                rate = c.batch_size / (now - tick)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", samples_s=f"{rate:.0f}")
                if self.step % c.log_every == 0 or self.step == stop:
                    row = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
                    self._log({"step": self.step, **row, "lr": self.lr_at(step), "samples_per_s": rate,
                               "logit_scale": float(self.model.logit_scale.detach().exp())})
                    window = []
                if c.eval_every and self.step % c.eval_every == 0 and self.step < stop:
                    bar.write(self._eval_line())
                if c.save_every and self.step % c.save_every == 0:
                    self.save()
                if deadline is not None and time.monotonic() > deadline:
                    bar.write(f"max_minutes ({c.max_minutes}) reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            self.save()
            bar.write(f"interrupted: checkpoint of step {self.step} in {self.checkpoint_path}")
            raise
        finally:
            bar.close()
        self.save()
        if self.eval_data is not None:
            print(self._eval_line(), file=sys.stderr)
        plot_run(self.metrics_path, os.path.join(c.out_dir, "curves.png"))
        return self.last_eval

    def evaluate(self) -> dict:
        """Metrics on the eval data (EvalSet), now."""
        if self.eval_data is None:
            return {}
        return evaluate(self.model, self.tokenizer, self.eval_data, device=self.device, autocast=self.autocast,
                        backend=self.config.backend)

    def chance(self) -> dict:
        return chance(self.tokenizer, self.eval_data, self.model.config.text.max_len,
                      mlm=getattr(self.model, "fusion", None) is not None)

    def _eval_line(self) -> str:
        self.last_eval = self.evaluate()
        self._log({"step": self.step, "eval": self.last_eval})
        return f"step {self.step}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in self.last_eval.items())

    def _log(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Optional[str] = None) -> str:
        path = path or self.checkpoint_path
        checkpoint.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "step": self.step, "config": self.config.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                         "model_config": dataclasses.asdict(self.model.config), "rng": _rng_state()}, path)
        return path

    def load(self, path: str) -> "Trainer":
        """Restores weights, optimizer, step and RNG from a checkpoint; metrics.jsonl keeps only the
        rows up to its step (a run stopped after its last checkpoint logs those steps again)."""
        state = checkpoint.load(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        _set_rng_state(state["rng"])
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                rows = [line for line in f if json.loads(line)["step"] <= self.step]
            with open(self.metrics_path, "w") as f:
                f.writelines(rows)
        return self

    @classmethod
    def resume(cls, run_dir: str, **overrides) -> "Trainer":
        """The run in run_dir, at its checkpoint; overrides: config fields to change (e.g. steps)."""
        state = checkpoint.load(os.path.join(run_dir, "checkpoint.pt"))
        config = TrainConfig.from_dict({**state["config"], "out_dir": run_dir, **overrides})
        tokenizer = Tokenizer.from_dict(state["tokenizer"])
        model = CLIPModel(ModelConfig.from_dict(state["model_config"]))
        return cls(config, model=model, tokenizer=tokenizer).load(os.path.join(run_dir, "checkpoint.pt"))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _progress(c: TrainConfig, initial: int):
    """A tqdm bar when tqdm is installed and wanted, else a stand-in that prints nothing but writes."""
    if c.progress:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=c.steps, initial=initial, unit="step", dynamic_ncols=True)
        except ImportError:
            pass
    return _Quiet()


class _Quiet:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def write(self, s): print(s, file=sys.stderr)
    def close(self): pass
