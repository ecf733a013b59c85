"""A PNG of a run's curves from its metrics.jsonl: the training losses, and the evaluation metrics
(recall, zero-shot accuracy, masked-word accuracy). matplotlib is an optional extra."""
from __future__ import annotations

import json
from typing import Optional


# The evaluation curves of a pretraining run; MAX_CURVES: at most this many of a task's metrics.
PRETRAINING = ("text_to_image_R@5", "image_to_text_R@5", "zero_shot_top1_held_out", "mlm_accuracy",
               "mlm_accuracy_blank_image")
MAX_CURVES = 8


def read_metrics(path: str) -> tuple[list, list]:
    """(training rows, evaluation rows) of a metrics.jsonl."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            (evals if "eval" in row else train).append(row)
    return train, evals


def plot_run(metrics_path: str, png_path: str) -> Optional[str]:
    """Writes png_path and returns it, or returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = read_metrics(metrics_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses = sorted({k for row in train for k in row if k.startswith("loss")})
    for key in losses:
        rows = [r for r in train if key in r]
        left.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    left.set(xlabel="step", ylabel="loss", title="training loss")
    if losses:
        left.legend()
    present = sorted({k for r in evals for k in r["eval"]})
    keys = [k for k in PRETRAINING if k in present] or present[:MAX_CURVES]  # a task's run: its own metrics
    for key in keys:
        rows = [r for r in evals if key in r["eval"]]
        right.plot([r["step"] for r in rows], [100 * r["eval"][key] for r in rows], marker="o", label=key)
    right.set(xlabel="step", ylabel="%", title="held-out evaluation")
    if keys:
        right.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
