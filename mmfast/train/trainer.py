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

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import distributed
from mmfast.contrastive import clip_loss, siglip_loss
from mmfast.data import COLORS, SHAPES, SIZES, TEMPLATES, Shapes, Tokenizer
from mmfast.models import CLIPModel, ModelConfig
from mmfast.train import checkpoint, ranks
from mmfast.tasks import task_class
from mmfast.train.config import OBJECTIVES, TrainConfig, checkpoint_path
from mmfast.train.data import Batch, StepOrder, build_batch, datasets, loader, seed_of, tokenizer_for
from mmfast.train.evaluate import EvalSet, chance, evaluate
from mmfast.train.plot import plot_run

# The whole-batch objectives: (image features (B, E), text features (B, E), scale, bias, backend) → loss;
# across ranks (torchrun), this rank's loss over every rank's features, by strategy ("ring", "gather").
BATCH_LOSSES = {
    "clip": lambda a, b, scale, bias, backend: clip_loss(a, b, scale, backend=backend),
    "siglip": lambda a, b, scale, bias, backend: siglip_loss(a, b, scale, bias, backend=backend),
}
DISTRIBUTED_LOSSES = {
    "clip": lambda a, b, scale, bias, backend, strategy:
        distributed.clip_loss(a, b, scale, strategy=strategy, backend=backend),
    "siglip": lambda a, b, scale, bias, backend, strategy:
        distributed.siglip_loss(a, b, scale, bias, dist_impl=strategy, backend=backend),
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
        self.ranks = ranks.from_environment(self.device.type)
        if self.device.type == "cuda" and self.ranks.world > 1:
            self.device = torch.device("cuda", self.ranks.local_rank)
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=bf16)
        torch.manual_seed(c.seed)
        if c.init_from is not None and model is None:
            model, start_tokenizer = pretrained(c.init_from)
            tokenizer = tokenizer or start_tokenizer
        mc = model.config if model is not None else model_config(c)
        self.task = None
        if c.task is not None:
            if model is None:
                raise ValueError(f"objectives: the task {c.task!r} fine-tunes a pretrained model: set init_from "
                                 f"(a run folder or checkpoint) or pass model=")
            tokenizer = tokenizer or tokenizer_for(c.data, None)  # tasks run on shapes: its fixed vocabulary
            self.task = task_class(c.task)(model, tokenizer, c, self.device, self.autocast, c.task_options)
            train_data = self.task.train_data()
        elif train_data is None:
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
        if self.task is not None:
            self.task.to(self.device)
            if self.task.frozen_backbone:
                self.model.requires_grad_(False).eval()  # eval: no dropout in the frozen features
        if self.ranks.world > 1:
            ranks.broadcast_parameters(self.model)
            if self.task is not None:
                ranks.broadcast_parameters(self.task)
            torch.manual_seed(seed_of(c.seed, "rank", self.ranks.rank))  # each rank its own dropout masks
        self.objectives = dict(c.objectives)
        self.batch_objectives = {k: w for k, w in self.objectives.items() if OBJECTIVES[k] == "batch"}
        if self.task is None:
            self._check_model()
        self.params = [p for m in (self.model, self.task) if m is not None for p in m.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]  # biases, norms, scale
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=c.lr,
                                           betas=self.task.betas if self.task is not None else (0.9, 0.999))
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
        """Linear warmup to lr over warmup_steps, then a cosine down to lr · min_lr_ratio at the last
        step (steps − 1). Extending a run (--resume --steps) stretches the cosine from there."""
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = (step + 1 - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def _contrastive(self, img: Tensor, txt: Tensor) -> dict:
        """{name: scalar loss} of the batch objectives on image, text features (B, E)."""
        model, backend = self.model, self.config.backend
        scale = model.logit_scale.exp()
        if self.ranks.world > 1:
            return {name: DISTRIBUTED_LOSSES[name](img, txt, scale, model.logit_bias, backend, self.config.distributed)
                    for name in self.batch_objectives}
        return {name: BATCH_LOSSES[name](img, txt, scale, model.logit_bias, backend)
                for name in self.batch_objectives}

    def _features(self, mb: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image features (b, E), normalised text features (b, E), patches (b, P, width))."""
        pooled, patches = self.model.visual(mb.images)
        text, _ = self.model.text(mb.ids, mb.mask)
        return F.normalize(pooled, dim=-1), F.normalize(text, dim=-1), patches

    def backward(self, batch) -> dict:
        """Accumulates the gradients of the batch's weighted loss into .grad (in accum_steps
        micro-batches) and returns the batch's loss values as floats: loss, and loss_NAME for
        each objective (loss_mlm is 0 for a batch without masked words); a task's batch (a dict):
        loss and loss_PART for each part of its loss."""
        if self.task is not None:
            with self.autocast():
                parts = self.task.losses(self.model, batch)
            weight = self.objectives[self.task.name]
            (weight * sum(parts.values())).backward()
            out = {f"loss_{n}": float(v.detach()) for n, v in parts.items()}
            out["loss"] = weight * sum(out.values())
            return out
        k = self.config.accum_steps
        micro = batch.split(k)
        losses = dict.fromkeys(self.objectives, 0.0)
        cached = self._first_pass(micro, losses) if self.batch_objectives and k > 1 else None
        masked_total = batch.masked_tokens if "mlm" in self.objectives else 0
        for j, mb in enumerate(micro):
            if cached:
                _set_rng_state(cached[j].rng)
            with self.autocast():
                total = self._micro_loss(mb, cached[j] if cached else None, masked_total, losses)
            if total.requires_grad:  # else nothing here can learn (frozen towers, no masked word)
                total.backward()
        out = {f"loss_{n}": v for n, v in losses.items()}
        out["loss"] = sum(self.objectives[n] * v for n, v in losses.items())
        return out

    def _first_pass(self, micro: list, losses: dict) -> list:
        """Feature caching: every micro-batch's features without a graph (the RNG state before
        each saved), the batch objectives on all of them; backpropagates the scale and bias terms
        and returns each micro-batch's (rng, ∂loss/∂image features, ∂loss/∂text features)."""
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
            weighted = self._weighted(self._contrastive(img, txt), losses)
        weighted.backward()
        k = len(micro)
        return [_Cached(*parts) for parts in zip(rng, img.grad.float().chunk(k), txt.grad.float().chunk(k))]

    def _micro_loss(self, mb: Batch, cache: Optional["_Cached"], masked_total: int, losses: dict) -> Tensor:
        """This micro-batch's share of the weighted loss, as a graph: the batch objectives (or,
        with a cache, its features · their cached gradients) and its masked words' share of the
        batch's mean MLM loss (its mean × its count / the batch's count)."""
        total = torch.zeros((), device=self.device)
        patches = None
        if self.batch_objectives:
            img, txt, patches = self._features(mb)
            if cache is not None:
                total = total + (img.float() * cache.image_grad).sum() + (txt.float() * cache.text_grad).sum()
            else:
                total = total + self._weighted(self._contrastive(img, txt), losses)
        count = mb.masked_tokens if masked_total else 0
        if count:
            if patches is None:
                _, patches = self.model.visual(mb.images)
            _, hidden = self.model.text(mb.mlm_ids, mb.mask)
            part = self.model.fusion(hidden, patches, mb.mlm_labels, mb.mask) * (count / masked_total)
            total = total + self.objectives["mlm"] * part
            losses["mlm"] += float(part.detach())
        return total

    def _weighted(self, parts: dict, losses: dict) -> Tensor:
        """Σ weight · loss over parts ({name: scalar loss}); records each value in losses."""
        for name, value in parts.items():
            losses[name] = float(value.detach())
        return sum(self.objectives[n] * v for n, v in parts.items())

    def train_step(self, batch) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if self.task is not None:
            self.task.prepare(self.model, self.step)
        losses = self.backward(batch)
        if self.ranks.world > 1:
            ranks.average_gradients(self.params, self.ranks.world)
        if self.config.grad_clip is not None:
            losses["grad_norm"] = float(nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        self.step += 1
        return losses

    # ---- the loop --------------------------------------------------------------------------------
    def batches(self, start: int, stop: int, rank: Optional[int] = None):
        """(step, Batch on the device) for steps start..stop-1 of this rank (or of `rank`): a
        function of (seed, step, rank) alone."""
        c, world = self.config, self.ranks.world
        rank = self.ranks.rank if rank is None else rank
        order = StepOrder(len(self.train_data), c.batch_size, c.seed, start, stop, rank, world)
        if self.task is not None:
            for step, batch in enumerate(loader(self.train_data, order, c.workers, self.task.collate), start):
                yield step, {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                             for k, v in batch.items()}
            return
        mlm_prob = c.mlm_prob if "mlm" in self.objectives else None
        for step, (images, captions) in enumerate(loader(self.train_data, order, c.workers), start):
            generator = torch.Generator().manual_seed(seed_of(c.seed, "mlm", step * world + rank))  # its MLM masks
            batch = build_batch(images, captions, self.tokenizer, self.model.config.text.max_len, mlm_prob, generator)
            yield step, batch.to(self.device)

    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Trains to config.steps (or stop_after steps, or max_minutes), evaluating every eval_every
        steps and at the end, checkpointing every save_every steps and at the end. Returns the last
        evaluation's metrics ({} without eval data)."""
        c = self.config
        main = self.ranks.main
        stop = c.steps if stop_after is None else min(c.steps, stop_after)
        os.makedirs(c.out_dir, exist_ok=True)
        if self.step == 0 and main:
            open(self.metrics_path, "w").close()
        deadline = None if c.max_minutes is None else time.monotonic() + 60 * c.max_minutes
        bar = _progress(c, self.step) if main else _Quiet(silent=True)
        window, tick = [], time.perf_counter()
        with _deferred_interrupt() as interrupted, bar:
            for step, batch in self.batches(self.step, stop):
                losses = self.train_step(batch)
                window.append(losses)
                now = time.perf_counter()
                rate = c.batch_size * self.ranks.world / (now - tick)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", samples_s=f"{rate:.0f}")
                if self.step % c.log_every == 0 or self.step == stop:
                    row = self._mean_over_ranks({k: sum(w[k] for w in window) / len(window) for k in window[-1]})
                    self._log({"step": self.step, **row, "lr": self.lr_at(step), "samples_per_s": rate,
                               "logit_scale": float(self.model.logit_scale.detach().exp())})
                    window = []
                if c.eval_every and self.step % c.eval_every == 0 and self.step < stop and main:
                    bar.write(self._eval_line())
                if c.save_every and self.step % c.save_every == 0:
                    self.save()
                late = deadline is not None and time.monotonic() > deadline
                interrupt, late = self._agree(bool(interrupted), late)
                if interrupt:
                    self.save()
                    bar.write(f"interrupted: checkpoint of step {self.step} in {self.checkpoint_path}")
                    raise KeyboardInterrupt
                if late:
                    bar.write(f"max_minutes ({c.max_minutes}) reached at step {self.step}")
                    break
        self.save()
        if self.ranks.world > 1:
            torch.distributed.barrier()  # the checkpoint is whole before any rank returns
        if (self.eval_data is not None or self.task is not None) and main:
            print(self._eval_line(), file=sys.stderr)
        if main:
            plot_run(self.metrics_path, os.path.join(c.out_dir, "curves.png"))
        return self.last_eval

    def _mean_over_ranks(self, row: dict) -> dict:
        """The logged losses: their mean over the ranks (one process: as they are)."""
        if self.ranks.world == 1:
            return row
        t = torch.tensor(list(row.values()), dtype=torch.float64, device=self._collective_device)
        torch.distributed.all_reduce(t)
        return dict(zip(row, (t / self.ranks.world).tolist()))

    @property
    def _collective_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _agree(self, *flags: bool) -> tuple:
        """Each flag, true on every rank if it is true on any (ranks stop at the same step)."""
        if self.ranks.world == 1:
            return flags
        t = torch.tensor(flags, dtype=torch.int32, device=self._collective_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def evaluate(self) -> dict:
        """Metrics on the eval data (EvalSet) or the task's, now."""
        if self.task is not None:
            return self.task.evaluate(self.model)
        if self.eval_data is None:
            return {}
        return evaluate(self.model, self.tokenizer, self.eval_data, device=self.device, autocast=self.autocast,
                        backend=self.config.backend)

    def chance(self) -> dict:
        """The chance level of each metric evaluate() reports ({} without eval data)."""
        if self.task is not None:
            return self.task.chance()
        if self.eval_data is None:
            return {}
        return chance(self.tokenizer, self.eval_data, self.model.config.text.max_len,
                      mlm=getattr(self.model, "fusion", None) is not None)

    def _eval_line(self) -> str:
        self.last_eval = self.evaluate()
        self._log({"step": self.step, "eval": self.last_eval})
        return f"step {self.step}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in self.last_eval.items())

    def _log(self, row: dict) -> None:
        if not self.ranks.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Optional[str] = None) -> str:
        """Writes the checkpoint (rank 0 only, under torchrun) and returns its path."""
        path = path or self.checkpoint_path
        if not self.ranks.main:
            return path
        checkpoint.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "task": self.task.state_dict() if self.task is not None else None,
                         "step": self.step, "config": self.config.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                         "model_config": dataclasses.asdict(self.model.config), "rng": _rng_state()}, path)
        return path

    def load(self, path: str) -> "Trainer":
        """Restores weights, optimizer, step and RNG from a checkpoint; metrics.jsonl keeps only the
        rows up to its step (a run stopped after its last checkpoint logs those steps again)."""
        state = checkpoint.load(path)  # on the CPU: the RNG states must stay there; load_state_dict moves the rest
        self.model.load_state_dict(state["model"])
        if self.task is not None:
            self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        _set_rng_state(state["rng"])
        if self.ranks.world > 1:  # the checkpoint holds rank 0's RNG: each rank its own stream again
            torch.manual_seed(seed_of(self.config.seed, f"rank {self.ranks.rank}", self.step))
        if os.path.isfile(self.metrics_path) and self.ranks.main:
            with open(self.metrics_path) as f:
                rows = [line for line in f if _step_of(line) <= self.step]
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


def pretrained(path: str) -> tuple[CLIPModel, Tokenizer]:
    """The CLIPModel (its weights) and the tokenizer of a checkpoint or a run folder's checkpoint.pt."""
    state = checkpoint.load(checkpoint_path(path, "init_from"))
    model = CLIPModel(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model, Tokenizer.from_dict(state["tokenizer"])


class _Cached(NamedTuple):
    """A micro-batch's first pass: its RNG state, ∂loss/∂ its image and text features (b, E) fp32."""
    rng: dict
    image_grad: Tensor
    text_grad: Tensor


def _step_of(line: str) -> float:
    """A metrics.jsonl row's step; a line cut short by a hard kill reads as past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C during a step is held until the step is done (a checkpoint saved mid-step would hold
    half-updated weights and a mid-step RNG state): yields a list that is non-empty once it came.
    A second Ctrl-C interrupts at once. Only the main thread can take signals: elsewhere, no-op."""
    hits: list = []
    if threading.current_thread() is not threading.main_thread():
        yield hits
        return

    def handler(signum, frame):
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, previous)


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
    """A progress bar that draws nothing; its write() prints, unless silent (the other ranks)."""
    def __init__(self, silent: bool = False): self.silent = silent
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def update(self, n): pass
    def set_postfix(self, **kw): pass

    def write(self, s):
        if not self.silent:
            print(s, file=sys.stderr)
