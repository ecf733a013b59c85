"""Visual question answering on the `shapes` questions (mmfast.data.questions): an answer decoder on
the fusion encoder, trained with the teacher-forced sequence loss through mmfast.linear_cross_entropy.

The question is read by the text tower and fused with the image's patches by the fusion encoder;
the decoder generates the answer word by word ([CLS] a1 … → a1 … [SEP]), attending causally to the
answer so far and to a memory of the fused question states plus one token of the image's pooled
feature. Its output projection is the text embedding (tied), so the answer words start from the
meanings pretraining gave them.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.cross_entropy import linear_cross_entropy
from mmfast.data import IGNORE_INDEX, Shapes, Tokenizer
from mmfast.data.questions import ANSWERS, TYPES, Questions, words
from mmfast.tasks.base import EVAL_BATCH, Task, eval_mode

# Decoder positions: [CLS] and up to three generated tokens. Answers have at most two words, so
# greedy decoding that has not emitted [SEP] after three tokens is cut there (and counted wrong).
MAX_ANSWER_TOKENS = 4


class DecoderBlock(nn.Module):
    """Pre-norm: x + causal self-attention, x + cross-attention to the memory, x + MLP.

    x: (B, L, W) answer states; memory: (B, M, W); memory_mask: (B, M) bool, True where x may
    attend. Self-attention needs no padding mask: causally, a real answer position never sees the
    padding after it, and padding positions are not scored.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.self_out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.q, self.kv, self.cross_out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def _split(self, x: Tensor, parts: int) -> Tensor:
        """(B, L, parts·W) → (parts, B, heads, L, W / heads)."""
        b, n, w = x.shape
        return x.view(b, n, parts, self.heads, w // (parts * self.heads)).permute(2, 0, 3, 1, 4)

    @staticmethod
    def _merge(a: Tensor) -> Tensor:
        """(B, heads, L, d) → (B, L, heads·d)."""
        return a.transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = self._split(self.qkv(self.norm1(x)), 3)
        x = x + self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)))
        q = self._split(self.q(self.norm2(x)), 1)[0]
        k, v = self._split(self.kv(memory), 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :], dropout_p=p)
        x = x + self.cross_out(self._merge(a))
        return x + self.mlp(self.norm3(x))


class VQA(Task):
    """Answers questions about `shapes` images; evaluated by exact match on questions about the
    test split's images, each holding a (colour, shape) pair training never shows.

    Batches (collate): images (B, 3, H, W); question_ids, question_mask (B, S); answer_inputs,
    answer_targets (B, L): [CLS] a1 … and a1 … [SEP], targets −100 at padding.
    """
    name = "vqa"
    headline = "vqa_exact_match"
    defaults = {"decoder_depth": 2, "questions_per_image": 2}
    # measured from the demo's checkpoint: 600–700 such steps (2 minutes on 2 cores) reach ~1.9× the
    # majority baseline; a short warmup let the answers collapse to one word per type early on
    recipe = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 50}

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config, device: torch.device,
                 autocast: Callable = contextlib.nullcontext, options: Optional[dict] = None):
        super().__init__(model, tokenizer, config, device, autocast, options)
        if getattr(model, "fusion", None) is None:
            raise ValueError("vqa needs a model with a fusion encoder (model.fusion is None): "
                             "start from a checkpoint pretrained with the 'mlm' objective")
        missing = [w for w in words() if w not in tokenizer.ids]
        if missing:
            raise ValueError(f"vqa: the tokenizer lacks the question words {missing}: start from a checkpoint "
                             "pretrained with the shapes vocabulary that includes them (Shapes.vocabulary())")
        if self.options["decoder_depth"] < 1:
            raise ValueError(f"task_options['decoder_depth'] must be >= 1, got {self.options['decoder_depth']}")
        text, fusion = model.config.text, model.config.fusion
        self.question_len, self.resolution = text.max_len, self.image_size(model)
        self.pos = nn.Parameter(torch.randn(1, MAX_ANSWER_TOKENS, text.width) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(text.width, fusion.heads, fusion.mlp_ratio, fusion.dropout)
                                    for _ in range(self.options["decoder_depth"]))
        # The pooled image feature as one more memory token: contrastive pretraining summarised the
        # whole image there (how many objects, which); counting is learned faster from it.
        self.pooled_in = nn.Linear(model.config.image.embed_dim, text.width)
        self.norm = nn.LayerNorm(text.width)
        self.bias = nn.Parameter(torch.zeros(text.vocab_size))  # the output's; its weight is the text embedding
        self._train_questions: Optional[Questions] = None
        self._eval_questions: Optional[Questions] = None

    # ---- data ------------------------------------------------------------------------------------
    def train_data(self) -> Questions:
        if self._train_questions is None:
            c = self.config
            shapes = Shapes("train", c.train_size, seed=c.seed, image_size=self.resolution)
            self._train_questions = Questions(shapes, seed=c.seed, per_image=self.options["questions_per_image"])
        return self._train_questions

    def eval_data(self) -> Questions:
        """Questions about the test split's images (one held-out pair in each)."""
        if self._eval_questions is None:
            c = self.config
            shapes = Shapes("test", c.eval_size, seed=c.seed, image_size=self.resolution)
            self._eval_questions = Questions(shapes, seed=c.seed, per_image=self.options["questions_per_image"])
        return self._eval_questions

    def collate(self, items: list) -> dict:
        images, questions, answers, _ = zip(*items)
        q_ids, q_mask = self.tokenizer.encode(questions, self.question_len)
        a_ids, _ = self.tokenizer.encode(answers, MAX_ANSWER_TOKENS + 1)
        targets = a_ids[:, 1:].masked_fill(a_ids[:, 1:] == self.tokenizer.pad_id, IGNORE_INDEX)
        return {"images": torch.stack(images), "question_ids": q_ids, "question_mask": q_mask,
                "answer_inputs": a_ids[:, :-1], "answer_targets": targets}

    # ---- the model -------------------------------------------------------------------------------
    def encode(self, model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), question ids and mask (B, S) → (memory (B, S + 1, W): the fused
        question states and the pooled image token, memory_mask (B, S + 1) bool: False at padding)."""
        pooled, patches = model.visual(images)
        _, hidden = model.text(ids, mask)
        memory = torch.cat([model.fusion.hidden(hidden, patches, mask), self.pooled_in(pooled)[:, None]], 1)
        return memory, F.pad(mask.bool(), (0, 1), value=True)

    def decode(self, model: nn.Module, inputs: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Answer tokens so far (B, L) int64, memory (B, M, W), memory_mask (B, M) → states (B, L, W)."""
        x = model.text.embed(inputs) + self.pos[:, : inputs.shape[1]]
        for block in self.blocks:
            x = block(x, memory, memory_mask)
        return self.norm(x)

    def losses(self, model: nn.Module, batch: dict) -> dict:
        """The mean cross-entropy over the answer tokens (padding excluded from the softmax)."""
        memory = self.encode(model, batch["images"], batch["question_ids"], batch["question_mask"])
        hidden = self.decode(model, batch["answer_inputs"], *memory)
        weight, bias = model.text.embed.weight, self.bias
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # as an autocast nn.Linear: compute in the autocast dtype
            dtype = torch.get_autocast_dtype(device)
            hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
        loss = linear_cross_entropy(hidden, weight, batch["answer_targets"], bias=bias,
                                    backend=getattr(self.config, "backend", None))
        return {"vqa": loss}

    @torch.no_grad()
    def answer(self, model: nn.Module, images: Tensor, questions: list[str]) -> list[Optional[str]]:
        """Greedy answers to a batch of questions, one per image (images (B, 3, H, W) in [0, 1]);
        None where no [SEP] came within MAX_ANSWER_TOKENS − 1 tokens. Call in eval mode."""
        ids, mask = self.tokenizer.encode(questions, self.question_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        memory = self.encode(model, images.to(self.device), ids, mask)
        tokens = torch.full((len(questions), 1), self.tokenizer.cls_id, device=self.device)
        done = torch.zeros(len(questions), dtype=torch.bool, device=self.device)
        for _ in range(MAX_ANSWER_TOKENS - 1):
            last = self.decode(model, tokens, *memory)[:, -1]
            nxt = F.linear(last, model.text.embed.weight, self.bias).argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == self.tokenizer.sep_id
            if bool(done.all()):
                break
        sep = self.tokenizer.sep_id
        return [self.tokenizer.decode(row[:row.index(sep)]) if sep in row else None for row in tokens[:, 1:].tolist()]

    # ---- metrics ---------------------------------------------------------------------------------
    @staticmethod
    def _scores(correct: list, types: list) -> dict:
        """Means of `correct` (per question: right or not, or the probability of being right)
        overall and per question type, under vqa_exact_match[_{type}]."""
        out = {"vqa_exact_match": sum(correct) / len(correct)}
        for t in TYPES:
            hits = [c for c, k in zip(correct, types) if k == t]
            if hits:
                out[f"vqa_exact_match_{t}"] = sum(hits) / len(hits)
        return out

    def evaluate(self, model: nn.Module) -> dict:
        data, predicted = self.eval_data(), []
        with eval_mode(model), eval_mode(self), self.autocast():
            for start in range(0, len(data), EVAL_BATCH):
                index = data.image_index[start:start + EVAL_BATCH]
                images = data.shapes.images[index].float() / 255
                predicted += self.answer(model, images, data.questions[start:start + EVAL_BATCH])
        return self._scores([p == a for p, a in zip(predicted, data.answers)], data.types)

    def baseline(self, model: nn.Module) -> dict:
        """The majority answer: per type, the training questions' most frequent answer, always."""
        train, data = self.train_data(), self.eval_data()
        majority = {t: Counter(a for a, k in zip(train.answers, train.types) if k == t).most_common(1)[0][0]
                    for t in set(train.types)}
        return self._scores([majority.get(k) == a for a, k in zip(data.answers, data.types)], data.types)

    def chance(self) -> dict:
        """A uniform guess among each type's possible answers."""
        data = self.eval_data()
        return self._scores([1 / len(ANSWERS[k]) for k in data.types], data.types)
