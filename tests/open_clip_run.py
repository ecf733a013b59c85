"""One open_clip_train run for tests/test_integrations_open_clip.py, in a process of its own:

    python tests/open_clip_run.py RESULT.json {open_clip|mmfast} ARGS [+ ARGS ...]

Each ARGS is one run's open_clip_train command line (runs separated by "+", one after the other in
this process). "mmfast" runs `mmfast.integrations.open_clip.main` (the `python -m
mmfast.integrations.open_clip` entry point); "open_clip" runs open_clip_train's own main. Either way
every loss the trainer computes is recorded at full precision, with the loss module's class: RESULT.json
holds a list, a record per run.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

# Where `make setup` installs the torchvision wheel (see _import_torchvision).
VISION = Path(__file__).resolve().parents[1] / ".venv" / "vision"


def _import_torchvision() -> None:
    """open_clip needs torchvision's image transforms. The registry's torchvision wheel is a CUDA
    build: beside a CPU torch its compiled ops cannot load, and its import then fails where it
    registers fake kernels for two of those ops (torchvision::nms, ::qnms) without checking that
    they exist. `make setup` installs that wheel off the venv's path (.venv/vision), so nothing
    else sees it; here the two schemas are defined first, and the pure-Python parts import."""
    try:
        importlib.import_module("torchvision")  # a working torchvision: nothing to do
        return
    except Exception:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    sys.path.insert(0, str(VISION))
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    """open_clip_train wraps the model as DDP(model, device_ids=[device]) on every device, which DDP
    rejects for a CPU module; on CPU (gloo, as these tests run) the ids are dropped."""

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


def main() -> int:
    result_path, mode, *argv = sys.argv[1:]
    _import_torchvision()
    torch.nn.parallel.DistributedDataParallel = _CpuDDP
    import open_clip_train.main as trainer

    from mmfast.integrations import open_clip as integration

    train_one_epoch = trainer.train_one_epoch
    records = []

    def recording_epoch(model, data, loss, *rest, **kwargs):
        record = records[-1]
        record["loss_class"] = f"{type(loss).__module__}.{type(loss).__name__}"
        record["dist_impl"] = getattr(loss, "dist_impl", None)

        def recorded(*inputs, **named):
            out = loss(*inputs, **named)
            record["losses"].append({k: v.item() for k, v in out.items()})
            return out
        return train_one_epoch(model, data, recorded, *rest, **kwargs)

    trainer.train_one_epoch = recording_epoch
    runs = " ".join(argv).split(" + ")  # a run's arguments hold no spaces (the tests' do not)
    for args in (run.split() for run in runs):
        records.append({"losses": [], "loss_class": None})
        records[-1]["returned"] = integration.main(args) if mode == "mmfast" else trainer.main(args)
        integration.unpatch()
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0's losses
        Path(result_path).write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
