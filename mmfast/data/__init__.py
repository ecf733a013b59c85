"""Data for mmfast's models (design.md §5): the embedded `shapes` dataset of procedurally drawn
image–caption pairs with held-out (colour, shape) pairs, a download-free word tokenizer with BERT
masking, and loaders for users' own (image, caption) listings and precomputed embeddings.

    train = Shapes("train", 10000)
    tokenizer = Tokenizer(Shapes.vocabulary(), maskable=Shapes.attribute_words())
    ids, mask = tokenizer.encode(train.captions[:64], max_len=32)
"""
from mmfast.data.files import CaptionFiles, EmbeddingPairs
from mmfast.data.questions import Questions
from mmfast.data.shapes import COLORS, HELD_OUT, QUESTION_WORDS, SHAPES, SIZES, TEMPLATES, Obj, Shapes
from mmfast.data.tokenizer import IGNORE_INDEX, Tokenizer

__all__ = ["COLORS", "CaptionFiles", "EmbeddingPairs", "HELD_OUT", "IGNORE_INDEX", "Obj", "QUESTION_WORDS", "Questions",
           "SHAPES", "SIZES", "Shapes", "TEMPLATES", "Tokenizer"]
