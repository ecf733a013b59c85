"""Distributed CLIP loss on CPU ranks (gloo): mmfast's ring and gather strategies against open_clip's
ClipLoss(local_loss=True, gather_with_grad=True), at a fixed local batch, on 1, 2 and 4 ranks.

    python benchmarks/bench_distributed.py [--batch 4096] [--dim 512] [--worlds 1 2 4] [--repeats 2]

Each (implementation, world size) runs in fresh processes joined in a gloo group. Per rank:
forward + backward of the rank's loss over its own (B, D) features; time = median of warm
repeats, extra memory = growth of the peak RSS over one call (harness.peak_growth; glibc's mmap
threshold fixed so freed blocks go back at once). The table shows the worst rank. The ranks share
this machine's cores, so times at several ranks measure the CPU's sharing, not a cluster: memory is
the figure here (the ring's per-rank memory is flat in the world size; open_clip's holds B × W·B
logits).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import harness  # noqa: E402
import peers  # noqa: E402

IMPLS = ("ring", "gather", "open_clip")


def make_loss(impl: str, rank: int, world: int):
    import mmfast.distributed as md

    if impl == "open_clip":
        oc = peers.open_clip_loss().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return lambda a, b, s: oc(a, b, s)
    return lambda a, b, s: md.clip_loss(a, b, s, strategy=impl)


def rank_main(rank: int, world: int, store: str, impl: str, batch: int, dim: int, repeats: int, out: str):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    g = torch.Generator().manual_seed(rank)
    a = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    loss_fn = make_loss(impl, rank, world)

    def step():
        for t in (a, b, scale):
            t.grad = None
        loss_fn(a, b, scale).backward()

    step()  # warm-up
    dist.barrier()
    extra = harness.peak_growth(step)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"extra_mib": extra / 2**20, "seconds": statistics.median(times)}, f)
    dist.destroy_process_group()


def run(impl: str, world: int, batch: int, dim: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.start_processes(rank_main, args=(world, os.path.join(tmp, "store"), impl, batch, dim, repeats, out),
                           nprocs=world, join=True, start_method="spawn")
        ranks = [json.load(open(f"{out}.{r}")) for r in range(world)]
    return {"impl": impl, "world": world, "batch": batch, "dim": dim,
            "extra_mib": max(r["extra_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the ranks inherit it (see the docstring)
    impls = [i for i in args.impls if i != "open_clip" or peers.open_clip_loss() is not None]
    rows = []
    for world in args.worlds:
        for impl in impls:
            rows.append(run(impl, world, args.batch, args.dim, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        same_world = {r["impl"]: r for r in rows if r["world"] == row["world"]}
        if "open_clip" in same_world:
            row["memory_vs_open_clip"] = row["extra_mib"] / same_world["open_clip"]["extra_mib"]
        two = [r for r in rows if r["impl"] == row["impl"] and r["world"] == 2]
        if two:
            row["memory_vs_2_ranks"] = row["extra_mib"] / two[0]["extra_mib"]
    columns = [("impl", "impl", "s"), ("ranks", "world", "d"), ("s per rank", "seconds", ".2f"),
               ("extra MiB per rank", "extra_mib", ".1f"), ("memory / open_clip", "memory_vs_open_clip", ".3f"),
               ("memory / 2 ranks", "memory_vs_2_ranks", ".3f")]
    harness.report("distributed-cpu", {"machine": harness.machine(), "args": vars(args), "rows": rows}, columns,
                   args.out)


if __name__ == "__main__":
    main()
