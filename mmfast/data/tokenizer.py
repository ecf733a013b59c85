"""A download-free word tokenizer with BERT's masked-language-model masking.

A vocabulary is a list of lowercase words (punctuation marks are words of their own) after five
special tokens; texts become rows of ids `[CLS] words… [SEP]`, padded with `[PAD]` to the batch's
longest row.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional, Sequence, Union

import torch

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIALS = (PAD, CLS, SEP, MASK, UNK)
IGNORE_INDEX = -100  # the label of positions the loss skips (torch's cross_entropy default)
WORD = re.compile(r"\w+|[^\w\s]")


class Tokenizer:
    """Maps words to ids: the specials are 0..4, then `words` in order.

    `maskable` are the words masked-language modelling may mask (default: all of `words`).
    """

    def __init__(self, words: Sequence[str], maskable: Optional[Sequence[str]] = None):
        words = list(words)
        if not words:
            raise ValueError("words is empty; expected at least one word")
        for w in words:
            if w in SPECIALS:
                raise ValueError(f"words must not contain the special token {w!r}")
            if self.split(w) != [w]:
                raise ValueError(f"words must be lowercase words or single punctuation marks, got {w!r}")
        if len(set(words)) != len(words):
            duplicates = sorted(w for w, c in Counter(words).items() if c > 1)
            raise ValueError(f"words has duplicates: {duplicates}")
        self.words = words
        self.ids = {w: i for i, w in enumerate(SPECIALS + tuple(words))}
        self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id = range(len(SPECIALS))
        maskable = words if maskable is None else list(dict.fromkeys(maskable))
        unknown = [w for w in maskable if w not in self.ids or w in SPECIALS]
        if unknown:
            raise ValueError(f"maskable has words not in the vocabulary: {unknown}")
        self.maskable = maskable
        self.maskable_ids = torch.tensor([self.ids[w] for w in maskable], dtype=torch.int64)

    @classmethod
    def from_texts(cls, texts: Sequence[str], maskable: Optional[Sequence[str]] = None,
                   min_count: int = 1) -> "Tokenizer":
        """The words occurring at least `min_count` times in `texts`, in order of first appearance."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(w for text in texts for w in cls.split(text))  # Counter keeps first-appearance order
        return cls([w for w, c in counts.items() if c >= min_count], maskable)

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercase words and single punctuation marks: "A red circle," → ["a", "red", "circle", ","]."""
        return WORD.findall(text.lower())

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """texts → (ids (B, S) int64, mask (B, S) bool, True on real tokens), S ≤ max_len the longest row.

        Rows longer than max_len lose their last words; [CLS] stays first and [SEP] last.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, got a single str; wrap it in a list")
        if len(texts) == 0:
            raise ValueError("texts is empty; expected at least one text")
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 ([CLS], a word, [SEP]), got {max_len}")
        rows = [[self.cls_id] + [self.ids.get(w, self.unk_id) for w in self.split(t)][:max_len - 2] + [self.sep_id]
                for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        return ids, ids != self.pad_id

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        """One row of ids → its words joined by spaces, special tokens dropped."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1:
            raise ValueError(f"ids must be one row (1-D), got shape {tuple(ids.shape)}")
        vocab = SPECIALS + tuple(self.words)
        return " ".join(vocab[i] for i in ids.tolist() if i >= len(SPECIALS))

    def to_dict(self) -> dict:
        """Plain lists of str, loadable from a checkpoint with torch.load(weights_only=True)."""
        return {"words": list(self.words), "maskable": list(self.maskable)}

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        return cls(d["words"], d["maskable"])

    def _maskable(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be 2-D (B, S), got shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"mask must be a bool tensor of the shape of ids {tuple(ids.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return torch.isin(ids, self.maskable_ids.to(ids.device)) & mask

    def mask_tokens(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                    prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masking: each maskable token (a maskable word where mask is True) is selected with
        probability `prob`; a selected token becomes [MASK] (80%), a random word (10%) or stays (10%).

        ids, mask: (B, S); generator: on ids.device, drawn from for every random choice.
        Returns (input_ids (B, S), labels (B, S)): labels hold the original id where selected and
        IGNORE_INDEX elsewhere. `ids` is not modified.
        """
        if not 0 < prob <= 1:  # also rejects NaN
            raise ValueError(f"prob must be in (0, 1], got {prob}")
        maskable = self._maskable(ids, mask)
        kw = dict(generator=generator, device=ids.device)
        selected = maskable & (torch.rand(ids.shape, **kw) < prob)
        action = torch.rand(ids.shape, **kw)
        random_words = torch.randint(len(SPECIALS), self.vocab_size, ids.shape, **kw)
        inputs = torch.where(selected & (action < 0.8), self.mask_id, ids)
        inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_words, inputs)
        labels = torch.where(selected, ids, IGNORE_INDEX)
        return inputs, labels

    def mask_one(self, ids: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """For evaluation: in each row with a maskable token, one of them (uniformly) becomes [MASK].

        Returns (input_ids (B, S), labels (B, S)) as mask_tokens does; rows without a maskable
        token are unchanged and labelled IGNORE_INDEX throughout.
        """
        maskable = self._maskable(ids, mask)
        # The maskable position with the largest uniform score is a uniform pick among them.
        scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~maskable, -1)
        pick = torch.zeros_like(maskable).scatter_(1, scores.argmax(dim=1, keepdim=True), True) & maskable
        return torch.where(pick, self.mask_id, ids), torch.where(pick, ids, IGNORE_INDEX)
