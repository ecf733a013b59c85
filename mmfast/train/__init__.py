"""Training over mmfast's fused losses (design.md §5): TrainConfig, Trainer (one loop; objectives
clip, siglip, mlm with weights; feature-cached accumulation), evaluation with chance levels.

    from mmfast.train import TrainConfig, Trainer
    Trainer(TrainConfig(objectives={"clip": 1.0, "mlm": 1.0}, steps=300, out_dir="runs/a")).fit()
"""
from mmfast.train.config import TrainConfig
from mmfast.train.evaluate import EvalSet
from mmfast.train.trainer import Trainer

__all__ = ["EvalSet", "TrainConfig", "Trainer"]
