"""Retrieval fine-tuning with hard negatives: the CLIP loss, whose text→image direction also sees a
bank of images mined from the whole training pool with mmfast.topk_similarity every `mine_every`
steps: for each caption, the images it scores highest that are not its matches.

A caption's matches are every pool image with the same caption (`shapes` captions repeat: "a small
red circle" describes hundreds of images), so a "negative" that is a true match is never mined;
and the batch's bank drops every image matching any caption of the batch. With an empty bank the
loss is exactly clip_loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.contrastive import infonce_loss
from mmfast.data import Shapes
from mmfast.eval import retrieval_metrics
from mmfast.similarity import topk_similarity
from mmfast.tasks.base import EVAL_BATCH, Task, eval_mode
from mmfast.train.data import distinct_captions
from mmfast.train.evaluate import KS, embed


class Indexed(torch.utils.data.Dataset):
    """(pool index, image, caption) items of a dataset of (image, caption)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return (i, *self.pairs[i])


class Retrieve(Task):
    """Options: mine_every (steps between minings of the pool), negatives (mined images per distinct
    caption; 0: none, plain CLIP fine-tuning, the ablation). The pool is the training set
    (TrainConfig.train_size pairs)."""
    name = "retrieve"
    headline = "text_to_image_R@1"
    defaults = {"mine_every": 100, "negatives": 2}
    # a pool of 10000 (embedding it takes ~18 s on 2 cores, once per mine_every steps); lr 1e-4:
    # measured from the demo's checkpoint, 2e-4 over ~270 steps lost R@5 and R@10 while R@1 rose
    recipe = {"batch_size": 128, "lr": 1e-4, "warmup_steps": 10, "train_size": 10000}

    def __init__(self, model, tokenizer, config, device, autocast=None, options=None):
        super().__init__(model, tokenizer, config, device, autocast, options)
        o = self.options
        if o["mine_every"] < 1 or o["negatives"] < 0:
            raise ValueError(f"task_options: mine_every must be >= 1 and negatives >= 0, got {o}")
        self.max_len = model.config.text.max_len
        size = self.image_size(model)
        self.pool = Shapes("train", config.train_size, seed=config.seed, image_size=size)
        self.eval_pairs = distinct_captions(Shapes("test", config.eval_size, seed=config.seed, image_size=size))
        # caption_id (P,): the pool's captions as indices into `captions`, its distinct captions
        first: dict = {}
        self.caption_id = torch.tensor([first.setdefault(c, len(first)) for c in self.pool.captions])
        self.captions = list(first)
        # the mined table (Q distinct captions, negatives) and the step it was mined at (−1: never);
        # buffers, so that a resumed run mines where an uninterrupted one would
        self.register_buffer("mined", torch.zeros(len(self.captions), o["negatives"], dtype=torch.int64))
        self.register_buffer("mined_at", torch.tensor(-1))

    def train_data(self) -> Indexed:
        return Indexed(self.pool)

    def collate(self, items: list) -> dict:
        ids, mask = self.tokenizer.encode([c for *_, c in items], self.max_len)
        return {"index": torch.tensor([i for i, *_ in items]), "images": torch.stack([x for _, x, _ in items]),
                "ids": ids, "mask": mask}

    def prepare(self, model, step: int) -> None:
        if not self.options["negatives"]:
            return
        if int(self.mined_at) >= 0 and (step % self.options["mine_every"] or step == int(self.mined_at)):
            return
        self.mined.copy_(self.mine(model).to(self.mined.device))
        self.mined_at.fill_(step)

    @torch.no_grad()
    def mine(self, model) -> Tensor:
        """(Q, negatives) pool indices: for each distinct caption, the images it scores highest among
        those whose caption differs. Streams over the pool (topk_similarity): O(Q·k) memory."""
        with eval_mode(model):
            images, _ = embed(model, self.pool, self.tokenizer, self.device, self.autocast, texts=False)
            texts = []
            for i in range(0, len(self.captions), EVAL_BATCH):
                ids, mask = self.tokenizer.encode(self.captions[i:i + EVAL_BATCH], self.max_len)
                with self.autocast():
                    texts.append(model.encode_text(ids.to(self.device), mask.to(self.device)).float())
        # k covers a caption's own images (at most the most repeated caption's count) plus the negatives
        h = self.options["negatives"]
        k = min(len(self.pool), h + int(torch.bincount(self.caption_id).max()))
        _, top = topk_similarity(torch.cat(texts), images, k)
        top = top.cpu()
        keep = self.caption_id[top] != torch.arange(len(self.captions))[:, None]
        keep &= keep.cumsum(1) <= h  # the first h non-matches of each row, in score order
        return top[keep].view(len(self.captions), h)

    def bank(self, index: Tensor) -> Tensor:
        """The batch's negatives (K,) pool indices: the mined images of its captions, each once,
        minus every image whose caption is one of the batch's (a true match of some query)."""
        captions = self.caption_id[index.cpu()]
        bank = self.mined.cpu()[captions].flatten().unique()
        return bank[~torch.isin(self.caption_id[bank], captions)]

    def losses(self, model, batch: dict) -> dict:
        """½·InfoNCE(image → its caption) + ½·InfoNCE(caption → its image, against the batch's
        images and the mined bank): clip_loss with harder negatives on the text→image side."""
        img = F.normalize(model.visual(batch["images"])[0], dim=-1)
        txt = F.normalize(model.text(batch["ids"], batch["mask"])[0], dim=-1)
        scale = model.logit_scale.exp()
        bank = self.bank(batch["index"])
        negatives = None
        if len(bank):
            images = (self.pool.images[bank].float() / 255).to(self.device)
            negatives = F.normalize(model.visual(images)[0], dim=-1)
        return {"image_to_text": infonce_loss(img, txt, scale) / 2,
                "text_to_image": infonce_loss(txt, img, scale, negatives=negatives) / 2}

    def evaluate(self, model) -> dict:
        """R@1/5/10 both ways on the held-out pairs (one per distinct caption)."""
        with eval_mode(model):
            img, txt = embed(model, self.eval_pairs, self.tokenizer, self.device, self.autocast)
        owner = torch.arange(len(self.eval_pairs), device=img.device)
        return {k: v for k, v in retrieval_metrics(img, txt, owner, ks=KS).items() if "_R@" in k}

    def baseline(self, model) -> dict:
        """The starting checkpoint's recall, before fine-tuning."""
        return self.evaluate(model)

    def chance(self) -> dict:
        n = len(self.eval_pairs)
        return {f"{d}_R@{k}": min(k, n) / n for d in ("image_to_text", "text_to_image") for k in KS}
