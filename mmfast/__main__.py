"""Command line:
  python -m mmfast demo [--all]                  pretrain a tiny model on `shapes`, show what it learned
                                                 (--all: then fine-tune every task, one table)
  python -m mmfast train --config cfg.json       train (a JSON TrainConfig); --resume RUN_DIR continues
  python -m mmfast finetune --task T --from RUN   classify | retrieve | vqa | generate on a pretrained run
  python -m mmfast generate --from RUN --prompt "a red circle"   draw images for a caption (a PNG)
  python -m mmfast bench [--family F] [--plot]    CPU benchmarks of the op families over sizes (JSON, PNGs)
  python -m mmfast info                          versions and which backends run here (and why not)
  python -m mmfast eval-retrieval ...            retrieval metrics from .npy embeddings
"""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    import mmfast
    from mmfast import _backends, _cuda

    print(f"mmfast   {mmfast.__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (threads: {torch.get_num_threads()})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    cuda = torch.cuda.is_available()
    print(f"cuda     {torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}")
    if _backends.EXT_ERROR is None:
        print(f"_C       built (CPU kernels: {torch.ops.mmfast.cpu_capability()})")
    archs = _cuda.built_archs()
    print(f"kernels  {_cuda.LIBRARY.name}: " + (f"built for {archs}" if archs else
                                               "present" if _cuda.LIBRARY.exists() else "not built"))
    print("backends:")
    for name in _backends.BACKENDS:
        reason = _backends.unavailable_reason(name)
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    device = torch.device("cuda" if cuda else "cpu")
    chosen = _backends.select(None, device)
    why = "" if device.type != "cuda" or chosen == "cuda" else f"; not cuda: {_backends.unavailable_reason('cuda', device)}"
    print(f"default  {chosen} (for {device.type} tensors{why})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    from mmfast.eval import cli as eval_cli

    eval_cli.add_parser(sub)
    from mmfast.train import cli as train_cli

    train_cli.add_parsers(sub)
    from mmfast import bench_cli

    bench_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "eval-retrieval":
        return eval_cli.run(args)
    if args.command in ("train", "demo", "finetune", "generate"):
        return train_cli.run(args)
    if args.command == "bench":
        return bench_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
