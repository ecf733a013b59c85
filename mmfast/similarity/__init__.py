"""Fused similarity and streaming top-k (design.md §1.2)."""
from mmfast.similarity.api import similarity, topk_similarity

__all__ = ["similarity", "topk_similarity"]
