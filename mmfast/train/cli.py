"""`python -m mmfast train --config cfg.json` (or `--resume RUN_DIR`), `demo [--all]`,
`finetune --task TASK --from RUN_DIR` and `generate --from RUN_DIR --prompt "a red circle"`.
Exit codes: 0 done, 2 a bad config or argument (the message names the field), 130 interrupted
(the checkpoint of the last step is saved)."""
from __future__ import annotations

import json
import sys

import torch

from mmfast.tasks import TASKS


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
    d.add_argument("--all", action="store_true",
                   help="then fine-tune every task on the pretrained model and print one table "
                        "(without the fused-vs-naive table, which plain `demo` shows)")
    d.add_argument("--task-minutes", type=float, default=1.5,
                   help="with --all: each task's training budget (default: 1.5)")
    f = sub.add_parser("finetune", help="fine-tune a pretrained run for a task (classify, retrieve, vqa, generate)")
    f.add_argument("--task", required=True, choices=sorted(TASKS))
    f.add_argument("--from", dest="source", required=True, metavar="RUN_DIR",
                   help="the pretrained run folder (or a checkpoint file)")
    f.add_argument("--out", help="run folder (default: RUN_DIR/finetune-TASK)")
    f.add_argument("--minutes", type=float, default=2.0, help="training budget in minutes (default: 2)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a task option (JSON value), e.g. --option shots=8 --option freeze_backbone=true")
    g = sub.add_parser("generate", help="draw images for a caption with the text-to-image generator of a run")
    g.add_argument("--from", dest="source", required=True, metavar="RUN_DIR",
                   help="a pretrained run folder (its generator is trained first if it has none) or a generate run")
    g.add_argument("--prompt", required=True, help='a caption, e.g. "a large red circle"')
    g.add_argument("--n", type=int, default=8, help="images to draw (default: 8)")
    g.add_argument("--out", default="generated.png", help="PNG to write (default: generated.png)")
    g.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # demo, finetune, generate: the run folder keeps what was saved
        return 130
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()


def _options(pairs: list) -> dict:
    """["shots=8", "head=\"linear\""] → {"shots": 8, "head": "linear"}; a bare word is a string."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--option must be NAME=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _run(args) -> int:
    from mmfast.train import TrainConfig, Trainer, demo, finetune

    try:
        for name in ("minutes", "task_minutes"):
            if getattr(args, name, 1) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
        if args.command == "demo":
            return demo.run(args.out, args.minutes, args.seed, fused=not (args.no_fused_table or args.all),
                            tasks_minutes=args.task_minutes if args.all else None)
        if args.command == "finetune":
            finetune.finetune(finetune.finetune_config(args.task, args.source, args.out, args.minutes, args.seed,
                                                       _options(args.option)))
            return 0
        if args.command == "generate":
            return finetune.generate(args.source, args.prompt, args.n, args.out, args.seed)
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
