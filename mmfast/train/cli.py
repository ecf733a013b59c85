"""`python -m mmfast train --config cfg.json` (or `--resume RUN_DIR`) and `python -m mmfast demo`.
Exit codes: 0 done, 2 a bad config or argument (the message names the field), 130 interrupted
(the checkpoint of the last step is saved)."""
from __future__ import annotations

import sys

import torch


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train on the embedded shapes data or your own (a JSON TrainConfig)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a JSON file of mmfast.train.TrainConfig fields")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue the run whose checkpoint.pt is in RUN_DIR")
    p.add_argument("--out", help="run folder (overrides the config's out_dir)")
    p.add_argument("--steps", type=int, help="total steps (overrides the config's steps)")
    d = sub.add_parser("demo", help="pretrain a tiny CLIP + masked-LM model on `shapes` and show what it learned")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--minutes", type=float, default=2.5, help="training budget in minutes (default: 2.5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-fused-table", action="store_true", help="skip the fused-vs-naive loss table")


def run(args) -> int:
    try:
        return _run(args)
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()


def _run(args) -> int:
    from mmfast.train import TrainConfig, Trainer, demo

    try:
        if args.command == "demo":
            if not args.minutes > 0:
                raise ValueError(f"--minutes must be > 0, got {args.minutes}")
            return demo.run(args.out, args.minutes, args.seed, fused=not args.no_fused_table)
        overrides = {k: v for k, v in (("out_dir", args.out), ("steps", args.steps)) if v is not None}
        if args.resume:
            trainer = Trainer.resume(args.resume, **overrides)
        else:
            config = TrainConfig.from_json(args.config)
            trainer = Trainer(TrainConfig.from_dict({**config.to_dict(), **overrides}))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if trainer.ranks.main:
        print({k: round(v, 4) for k, v in metrics.items()})
        print(f"run folder: {trainer.config.out_dir}")
    return 0
