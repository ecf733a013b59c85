"""Masked-LM softmax: fused cross-entropy and linear + cross-entropy over the kept rows only."""
from mmfast.cross_entropy.api import cross_entropy, linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
