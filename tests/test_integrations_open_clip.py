"""mmfast.integrations.open_clip: open_clip's trainer, patched, trains as it does unpatched.

The end-to-end tests run open_clip_train (`--dataset-type synthetic`, a tiny model from a local
config, 4 steps on CPU) twice in fresh processes, through tests/open_clip_run.py: its own main, and
`mmfast.integrations.open_clip.main`. Every step's loss must agree, and the patched run must have
used mmfast's loss. open_clip's synthetic images are all alike; patch dropout makes the image
features differ, so the CLIP loss moves away from log(batch) and training changes it step by step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmfast.integrations import open_clip as integration
from mmfast.nn import ClipLoss, SigLipLoss

RUNNER = Path(__file__).resolve().parent / "open_clip_run.py"
TINY = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}

needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("open_clip_train") is None or importlib.util.find_spec("pandas") is None,
    reason="open_clip_train and its data modules are test dependencies (make setup)")


def _args(**overrides):
    """open_clip_train's parsed arguments, as create_loss reads them."""
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False,
                rank=0, world_size=1, horovod=False, loss_dist_impl=None)
    return argparse.Namespace(**{**base, **overrides})


def test_create_loss_maps_open_clip_arguments():
    loss = integration.create_loss(_args(local_loss=True, gather_with_grad=True))
    assert isinstance(loss, ClipLoss) and loss.local_loss and loss.gather_with_grad and loss.dist_impl == "gather"
    assert integration.create_loss(_args(local_loss=True, gather_with_grad=True), ring=True).dist_impl == "ring"
    siglip = integration.create_loss(_args(siglip=True, loss_dist_impl="shift"), backend="torch")
    assert isinstance(siglip, SigLipLoss) and siglip.dist_impl == "shift" and siglip.backend == "torch"
    assert integration.create_loss(_args(siglip=True), ring=True).dist_impl == "ring"
    assert integration.create_loss(_args(siglip=True)).dist_impl == "bidir"  # open_clip's default


def test_create_loss_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="dist_impl='ring' computes open_clip's local_loss=True"):
        integration.create_loss(_args(), ring=True)
    for siglip in (False, True):
        with pytest.raises(ValueError, match="--horovod is not supported"):
            integration.create_loss(_args(horovod=True, siglip=siglip))
    with pytest.raises(ValueError, match="backend must be None or one of"):
        integration.patch(backend="gpu")


def _trainer(tmp: Path, mode: str, runs: list[list[str]], ranks: int = 1) -> subprocess.Popen:
    """Starts tests/open_clip_run.py: the runs (each its extra arguments) one after the other, on
    `ranks` gloo processes under torchrun if more than one."""
    model = tmp / "model"
    if not model.exists():
        model.mkdir()
        (model / "open_clip_config.json").write_text(json.dumps(TINY))
    common = ["--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", str(16 // ranks),
              "--epochs", "1", "--workers", "0", "--device", "cpu", "--model", f"local-dir:{model}", "--lr", "1e-3",
              "--warmup", "1", "--log-every-n-steps", "1", "--seed", "0", "--precision", "fp32",
              "--force-patch-dropout", "0.5", "--report-to=", "--save-frequency", "0", "--logs", str(tmp / mode)]
    runs = [[*common, "--name", f"run{i}", *run] for i, run in enumerate(runs)]
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "--"]
    cmd = [*launcher, str(RUNNER), str(tmp / f"{mode}.json"), mode, *runs[0]]
    for run in runs[1:]:
        cmd += ["+", *run]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several processes on two cores
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _records(tmp: Path, procs: dict) -> dict:
    """Waits for the started runs → {mode: [record per run]}."""
    records = {}
    for mode, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        records[mode] = json.loads((tmp / f"{mode}.json").read_text())
    return records


def _assert_same_losses(ref: dict, ours: dict, name: str, rel: float) -> None:
    assert ref["loss_class"] == f"open_clip.loss.{name}" and ours["loss_class"] == f"mmfast.nn.contrastive.{name}"
    values = [step["contrastive_loss"] for step in ref["losses"]]
    assert len(values) == 4 and len(set(values)) == 4  # training moves the loss at every step
    assert [step["contrastive_loss"] for step in ours["losses"]] == pytest.approx(values, rel=rel, abs=0)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The trainer unpatched and patched (two processes at once), each training CLIP, then SigLIP
    → {"open_clip": {"clip": record, "siglip": record}, "mmfast": {...}}."""
    tmp = tmp_path_factory.mktemp("open_clip_train")
    procs = {mode: _trainer(tmp, mode, [[], ["--siglip"]]) for mode in ("open_clip", "mmfast")}
    return {mode: dict(zip(("clip", "siglip"), runs)) for mode, runs in _records(tmp, procs).items()}


@needs_trainer
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_trainer_losses_match_patched_and_unpatched(trainer_runs, loss):
    ref, ours = trainer_runs["open_clip"][loss], trainer_runs["mmfast"][loss]
    _assert_same_losses(ref, ours, "SigLipLoss" if loss == "siglip" else "ClipLoss", rel=2e-6)


@needs_trainer
@pytest.mark.slow
def test_trainer_ring_on_two_ranks_matches_open_clips_gather(tmp_path):
    """torchrun, two gloo ranks, --local-loss --gather-with-grad: open_clip's all-gather against
    --mmfast-ring; rank 0's losses agree."""
    gather = ["--dist-backend", "gloo", "--local-loss", "--gather-with-grad"]
    procs = {"open_clip": _trainer(tmp_path, "open_clip", [gather], ranks=2),
             "mmfast": _trainer(tmp_path, "mmfast", [[*gather, "--mmfast-ring"]], ranks=2)}
    records = _records(tmp_path, procs)
    ref, ours = records["open_clip"][0], records["mmfast"][0]
    assert ours["dist_impl"] == "ring"
    _assert_same_losses(ref, ours, "ClipLoss", rel=5e-6)
