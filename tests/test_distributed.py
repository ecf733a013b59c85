"""mmfast.distributed with real processes (gloo on CPU, 2 and 3 ranks, each run under a timeout):
every strategy's per-rank loss and gradients against a float64 reference built from the whole
batch, or against open_clip's own ClipLoss/SigLipLoss run in the same processes; unequal local
batches; bf16; a mismatch between ranks raises on every rank."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mmfast
import mmfast.distributed as md
from tests import oracle
from tests.helpers import rel_err

TIMEOUT_S = 120
D = 12


def spawn(fn, world: int, tmp_path, *args) -> None:
    """Runs fn(rank, world, *args) in `world` processes joined in a gloo group; fails on any
    rank's exception or after TIMEOUT_S."""
    store = str(tmp_path / "store")
    ctx = mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    while not ctx.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish within {TIMEOUT_S} s")


def _entry(rank, world, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def features(sizes, dtype=torch.float64, seed=0):
    """Every rank's (image, text) features, from one seed: (Σ sizes, D) each, L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return (F.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=1),
            F.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=1))


def own(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start: start + sizes[rank]]


def leaf(x, dtype=torch.float32):
    return x.detach().to(dtype).clone().requires_grad_()


def reference(kind, A, T, sizes, rank, scale, bias=None, eps=0.0):
    """float64: (this rank's loss, ∂(Σ_k L_k)/∂(own image, own text) , ∂L_rank/∂scale, ∂L_rank/∂bias)."""
    A, T = leaf(A, torch.float64), leaf(T, torch.float64)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0 if bias is None else bias, dtype=torch.float64, requires_grad=True)
    losses = []
    for k in range(len(sizes)):
        a, t = own(A, sizes, k), own(T, sizes, k)
        labels = torch.arange(sizes[k]) + sum(sizes[:k])
        if kind == "clip":
            loss = (F.cross_entropy(s * a @ T.T + b, labels, label_smoothing=eps)
                    + F.cross_entropy(s * t @ A.T + b, labels, label_smoothing=eps)) / 2
        elif kind == "infonce":
            loss = F.cross_entropy(s * a @ T.T, labels, label_smoothing=eps)
        else:  # siglip: this rank's images against every text, positives on its own diagonal
            signs = -torch.ones(sizes[k], A.shape[0], dtype=torch.float64)
            signs[torch.arange(sizes[k]), labels] = 1
            loss = -F.logsigmoid(signs * (s * a @ T.T + b)).sum() / sizes[k]
        losses.append(loss)
    ds, db = torch.autograd.grad(losses[rank], (s, b), retain_graph=True, allow_unused=True)
    gA, gT = torch.autograd.grad(sum(losses), (A, T))
    return losses[rank], own(gA, sizes, rank), own(gT, sizes, rank), ds, db


def check(name, got, want, tol):
    err = rel_err(got, want, floor=1e-12) if torch.is_tensor(want) and want.numel() > 1 else \
        abs(float(got) - float(want)) / max(abs(float(want)), 1e-12)
    assert err < tol, f"{name}: relative error {err:.2e} > {tol}"


def _ring_against_the_whole_batch(rank, world):
    sizes = [5, 3, 7][:world]  # unequal local batches
    A, T = features(sizes)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        cases = [("clip", dict()), ("clip", dict(logit_bias=-1.5, label_smoothing=0.1)),
                 ("infonce", dict()), ("infonce", dict(label_smoothing=0.2)), ("siglip", dict(logit_bias=-3.0))]
        for kind, opts in cases:
            a, t = leaf(own(A, sizes, rank), dtype), leaf(own(T, sizes, rank), dtype)
            s = torch.tensor(7.0, requires_grad=True)
            bias = None if "logit_bias" not in opts else torch.tensor(opts["logit_bias"], requires_grad=True)
            if kind == "clip":
                loss = md.clip_loss(a, t, s, logit_bias=bias, label_smoothing=opts.get("label_smoothing", 0.0))
            elif kind == "infonce":
                loss = md.infonce_loss(a, t, s, label_smoothing=opts.get("label_smoothing", 0.0))
            else:
                loss = md.siglip_loss(a, t, s, bias)
            loss.backward()
            want = reference(kind, A, T, sizes, rank, 7.0, opts.get("logit_bias"), opts.get("label_smoothing", 0.0))
            label = f"{kind} {opts} {dtype} rank {rank}/{world}"
            check(f"{label} loss", loss, want[0], tol)
            check(f"{label} d image", a.grad, want[1], tol)
            check(f"{label} d text", t.grad, want[2], tol)
            check(f"{label} d scale", s.grad, want[3], max(tol, 1e-5))
            if bias is not None:
                assert abs(float(bias.grad) - float(want[4])) < max(tol, 1e-5) * max(1.0, abs(float(want[4]))), label


def _gather_and_siglip_against_open_clip(rank, world):
    oc = oracle.open_clip_loss_module()
    sizes = [4] * world
    A, T = features(sizes, seed=1)
    for local_loss in (False, True):
        for with_grad in (False, True):
            out = []
            for impl, dtype in (("mmfast", torch.float32), ("open_clip", torch.float64)):
                a, t = leaf(own(A, sizes, rank), dtype), leaf(own(T, sizes, rank), dtype)
                s = torch.tensor(9.0, dtype=dtype, requires_grad=True)
                module = mmfast.nn.ClipLoss if impl == "mmfast" else oc.ClipLoss  # the drop-in, as a user would
                loss = module(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)(a, t, s)
                loss.backward()
                out.append((loss, a.grad, t.grad, s.grad))
            label = f"gather local_loss={local_loss} gather_with_grad={with_grad} rank {rank}/{world}"
            for name, got, want in zip(("loss", "d image", "d text", "d scale"), *out):
                check(f"{label} {name}", got, want, 1e-5)
    # the ring's per-rank losses average to the global loss on the concatenated batch
    a, t = own(A, sizes, rank).float(), own(T, sizes, rank).float()
    ring = mmfast.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, dist_impl="ring")
    mine = ring(a, t, 9.0).detach()
    dist.all_reduce(mine)
    check("mean of ring losses", mine / world, mmfast.clip_loss(A.float(), T.float(), 9.0), 1e-5)
    for dist_impl in md.SIGLIP_IMPLS:
        out = []
        for impl, dtype in (("mmfast", torch.float32), ("open_clip", torch.float64)):
            a, t = leaf(own(A, sizes, rank), dtype), leaf(own(T, sizes, rank), dtype)
            s = torch.tensor(5.0, dtype=dtype, requires_grad=True)
            b = torch.tensor(-2.0, dtype=dtype, requires_grad=True)
            if impl == "mmfast":
                loss = mmfast.nn.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(a, t, s, b)
            else:
                loss = oc.SigLipLoss(rank=rank, world_size=world,
                                     dist_impl="shift" if dist_impl == "ring" else dist_impl)(a, t, s, b)
            loss.backward()
            out.append((loss, a.grad, t.grad, s.grad, b.grad))
        for name, got, want in zip(("loss", "d image", "d text", "d scale", "d bias"), *out):
            check(f"siglip {dist_impl} rank {rank}/{world} {name}", got, want, 1e-5)


def _mismatch_raises_on_every_rank(rank, world):
    a = torch.randn(4, D if rank == 0 else D - 2)
    with pytest.raises(ValueError, match="feature size D differs across ranks"):
        md.clip_loss(a, a, 5.0)
    a = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"strategy differs across ranks \(by rank: \['ring', 'gather'"):
        md.clip_loss(a, a, 5.0, strategy="ring" if rank == 0 else "gather")
    x = a.to(torch.bfloat16 if rank == 1 else torch.float32)
    with pytest.raises(ValueError, match=r"dtype differs across ranks \(by rank: \['float32', 'bfloat16'\]"):
        md.clip_loss(x, x, 5.0)
    with pytest.raises(ValueError, match="backward .* differs"):
        md.clip_loss(a.clone().requires_grad_(rank == 0), a, 5.0)
    sizes_differ = torch.randn(3 + rank, D)
    with pytest.raises(ValueError, match="strategy='gather' needs equal local batch sizes"):
        md.clip_loss(sizes_differ, sizes_differ, 5.0, strategy="gather")
    with pytest.raises(ValueError, match=r"label_smoothing differs across ranks \(by rank: \[0, 100000000\]"):
        md.clip_loss(a, a, 5.0, label_smoothing=0.1 * rank)
    # a rank whose own input is bad: its error there, and on the others an error naming it, not a hang
    empty = torch.randn(0 if rank == 1 else 4, D)
    with pytest.raises(ValueError, match="empty batch" if rank == 1 else r"rank\(s\) \[1\] rejected their inputs"):
        md.clip_loss(empty, empty, 5.0)
    md.clip_loss(a, a, 5.0)  # the group still works after the errors


@pytest.mark.parametrize("world", [2, 3])
def test_ring_equals_the_whole_batch_reference(tmp_path, world):
    spawn(_ring_against_the_whole_batch, world, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_gather_and_siglip_match_open_clip(tmp_path, world):
    if oracle.open_clip_loss_module() is None:
        pytest.skip("open_clip is not installed")
    spawn(_gather_and_siglip_against_open_clip, world, tmp_path)


def test_a_mismatch_between_ranks_raises_on_every_rank(tmp_path):
    spawn(_mismatch_raises_on_every_rank, 2, tmp_path)


def test_without_a_process_group_the_error_says_so():
    with pytest.raises(RuntimeError, match="initialised process group"):
        md.clip_loss(torch.randn(3, D), torch.randn(3, D), 5.0)


def _trainer_accumulates_across_ranks(rank, world, out_dir):
    """Under a process group the Trainer's contrastive loss spans the ranks: its step's gradients
    (averaged over the ranks by train_step's own code path), with accum_steps 1 and 2, equal those
    of one process on the two ranks' batches concatenated: the global CLIP loss plus the mean of
    the ranks' MLM losses (dropout 0)."""
    import copy

    from mmfast.train import TrainConfig, Trainer
    from tests.test_train import grads, small_model

    for strategy in ("ring", "gather"):
        for accum in (1, 2):
            torch.manual_seed(0)
            trainer = Trainer(TrainConfig(out_dir=out_dir, model=small_model(), train_size=128, eval_size=16,
                                          batch_size=16, accum_steps=accum, distributed=strategy, mlm_prob=0.3,
                                          progress=False, grad_clip=None, lr=1e-30))
            assert trainer.ranks.world == world and trainer.ranks.rank == rank
            single = copy.deepcopy(trainer.model)
            trainer.optimizer.step = lambda: None  # keep the gradients train_step averaged
            trainer.optimizer.zero_grad = lambda set_to_none=True: None
            trainer.train_step(next(iter(trainer.batches(0, 1)))[1])
            got = grads(trainer.model)
            parts = [next(iter(trainer.batches(0, 1, rank=r)))[1] for r in range(world)]
            img, txt, mlm = [], [], 0.0
            for b in parts:
                pooled, patches = single.visual(b.images)
                img.append(F.normalize(pooled, dim=-1))
                txt.append(F.normalize(single.text(b.ids, b.mask)[0], dim=-1))
                mlm = mlm + single.fusion(single.text(b.mlm_ids, b.mask)[1], patches, b.mlm_labels, b.mask) / world
            (mmfast.clip_loss(torch.cat(img), torch.cat(txt), single.logit_scale.exp()) + mlm).backward()
            for name, want in grads(single).items():
                check(f"{strategy} accum {accum} {name} rank {rank}", got[name], want, 1e-5)


def test_trainer_accumulation_across_ranks(tmp_path):
    spawn(_trainer_accumulates_across_ranks, 2, tmp_path, str(tmp_path / "run"))


def test_torchrun_trains_on_two_cpu_ranks(tmp_path):
    """`torchrun --nproc_per_node 2 -m mmfast train`: gloo, the ring, each rank its shard; loss falls."""
    import json
    import subprocess
    import sys

    from tests.test_train import config

    cfg = config(tmp_path, steps=16, train_size=1024, batch_size=32, lr=3e-3, warmup_steps=3, log_every=4,
                 eval_size=64, mlm_prob=0.4).to_dict()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmfast",
                          "train", "--config", str(path)], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(cfg["out_dir"], "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert out.stdout.count("run folder:") == 1  # rank 0 alone reports
