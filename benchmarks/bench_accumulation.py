"""Feature-cached accumulation (mmfast.train, accum_steps) against the unaccumulated step: the peak
memory and time of one step's forward + backward (Trainer.backward) on the `tiny` model with
clip + mlm, at one total batch, and the agreement of their gradients.

    python benchmarks/bench_accumulation.py [--batch 4096] [--accum 8] [--out DIR]

Each accum_steps value runs in a fresh process (harness.py): memory = growth of the peak RSS over
one step once the model, the optimizer and the batch exist (after a warm-up step at a small batch);
the gradients are saved and compared in float64 (max over parameters of ‖g_k − g_1‖ / ‖g_1‖).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402


def trainer(batch: int, accum: int, out_dir: str):
    from mmfast.train import TrainConfig, Trainer

    torch.manual_seed(0)
    config = TrainConfig(out_dir=out_dir, model="tiny", objectives={"clip": 1.0, "mlm": 1.0}, batch_size=batch,
                         accum_steps=accum, train_size=batch, eval_size=16, progress=False)
    return Trainer(config)


def worker(mode: str, batch: int, accum: int, grads_path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer(batch, accum, tmp)
        data = next(iter(t.batches(0, 1)))[1]
        warm = data.split(batch // (4 * accum))[0] if batch >= 4 * accum else data
        t.backward(warm)  # the code paths once, at a small batch
        t.optimizer.zero_grad(set_to_none=True)
        if mode == "memory":
            return {"extra_mib": harness.peak_growth(lambda: t.backward(data)) / 2**20}
        start = time.perf_counter()
        losses = t.backward(data)
        seconds = time.perf_counter() - start
        torch.save({n: p.grad for n, p in t.model.named_parameters()}, grads_path)
        return {"seconds": seconds, "loss": losses["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=4, metavar=("MODE", "BATCH", "ACCUM", "GRADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        mode, batch, accum, grads = args.worker
        print(json.dumps(worker(mode, int(batch), int(accum), grads)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for accum in (1, args.accum):
            grads = os.path.join(tmp, f"grads-{accum}.pt")
            row = {"batch": args.batch, "accum_steps": accum,
                   **harness.run_case(__file__, [str(args.batch), str(accum), grads])}
            rows.append(row)
        g1, gk = (torch.load(os.path.join(tmp, f"grads-{a}.pt")) for a in (1, args.accum))
        worst = max(float((gk[n].double() - g1[n].double()).norm() / g1[n].double().norm()) for n in g1)
    rows[1]["grad_rel_err_max"] = worst
    rows[1]["memory_ratio"] = rows[1]["extra_mib"] / rows[0]["extra_mib"]
    columns = [("batch", "batch", "d"), ("accum", "accum_steps", "d"), ("s", "seconds", ".2f"),
               ("extra MiB", "extra_mib", ".0f"), ("memory / accum 1", "memory_ratio", ".3f"),
               ("max grad rel err", "grad_rel_err_max", ".1e")]
    harness.report("accumulation-cpu", {"machine": harness.machine(), "rows": rows}, columns, args.out)


if __name__ == "__main__":
    main()
