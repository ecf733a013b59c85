"""open_clip's trainer (open_clip_train) with mmfast's losses: the same command line, no N×N logits.

    python -m mmfast.integrations.open_clip [open_clip_train's arguments] [--mmfast-ring] [--mmfast-backend NAME]
    torchrun --nproc-per-node 8 -m mmfast.integrations.open_clip --local-loss --gather-with-grad --mmfast-ring ...

or, in a launcher of your own, before open_clip_train's main runs:

    from mmfast.integrations import open_clip as mmfast_open_clip
    mmfast_open_clip.patch()

open_clip_train builds its loss with `create_loss(args)`, a name bound in open_clip_train.main;
patch() rebinds it to `create_loss` below, which builds mmfast.nn.ClipLoss or SigLipLoss (drop-ins
for open_clip's, mmfast.nn.contrastive) from the same arguments: --local-loss, --gather-with-grad,
--siglip, --loss-dist-impl, and the world size and rank of torch.distributed. --mmfast-ring passes
feature blocks around the ranks instead of all-gathering them (mmfast.distributed.ring): for CLIP
with --local-loss --gather-with-grad (the values it computes), and for SigLIP in place of
--loss-dist-impl. Distillation and CoCa runs keep open_clip's own losses (they add terms mmfast
does not compute). Horovod is not supported (mmfast runs on torch.distributed): an error says so.
patch() rebinds a name in the imported module open_clip_train.main, so it does not reach
`python -m open_clip_train.main` (a fresh copy of the module runs as __main__): use this module's
entry point, or call open_clip_train.main.main(args) after patch().
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from mmfast.nn import ClipLoss, SigLipLoss

_log = logging.getLogger(__name__)
# The options this module adds to open_clip_train's command line.
_OPTIONS = argparse.ArgumentParser(add_help=False)
_OPTIONS.add_argument("--mmfast-ring", action="store_true",
                      help="pass feature blocks around the ranks instead of all-gathering them")
_OPTIONS.add_argument("--mmfast-backend", default=None, help="mmfast's backend for the loss (default: by device)")


def create_loss(args, *, ring: bool = False, backend: Optional[str] = None):
    """The loss open_clip_train's create_loss(args) would build, as mmfast's drop-in (module
    docstring); open_clip's own for distillation and CoCa runs."""
    if args.horovod:
        raise ValueError("--horovod is not supported: mmfast's losses run on torch.distributed")
    if args.distill or "coca" in args.model.lower():
        _log.info("mmfast: distillation and CoCa runs keep open_clip's own loss")
        return importlib.import_module("open_clip").create_loss(args)
    if args.siglip:
        return SigLipLoss(rank=args.rank, world_size=args.world_size,
                          dist_impl="ring" if ring else args.loss_dist_impl, backend=backend)
    return ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                    rank=args.rank, world_size=args.world_size, dist_impl="ring" if ring else None,
                    backend=backend)


def patch(*, ring: bool = False, backend: Optional[str] = None) -> None:
    """Makes open_clip_train.main build its loss with `create_loss` above (again: updates the options)."""
    from mmfast import _backends

    if backend is not None and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be None or one of {_backends.BACKENDS}, got {backend!r}")
    main = _open_clip_train_main()
    if not hasattr(main, "_mmfast_open_clip_create_loss"):
        main._mmfast_open_clip_create_loss = main.create_loss
    main.create_loss = lambda args: create_loss(args, ring=ring, backend=backend)


def unpatch() -> None:
    """Gives open_clip_train its own create_loss back."""
    main = _open_clip_train_main()
    if hasattr(main, "_mmfast_open_clip_create_loss"):
        main.create_loss = main._mmfast_open_clip_create_loss
        del main._mmfast_open_clip_create_loss


def main(argv=None):
    """open_clip_train's main, patched: argv is its command line plus --mmfast-ring / --mmfast-backend."""
    ours, rest = _OPTIONS.parse_known_args(sys.argv[1:] if argv is None else argv)
    patch(ring=ours.mmfast_ring, backend=ours.mmfast_backend)
    return _open_clip_train_main().main(rest)


def _open_clip_train_main():
    try:
        return importlib.import_module("open_clip_train.main")
    except ImportError as exc:
        raise ImportError(f"mmfast.integrations.open_clip needs open_clip's trainer, open_clip_train "
                          f"(pip install 'open-clip-torch[training]'); importing it failed: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
