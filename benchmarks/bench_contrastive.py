"""clip_loss forward+backward on CPU, fp32: mmfast's backends against open_clip's ClipLoss and the floor.

    python benchmarks/bench_contrastive.py [--sizes 4096 8192 16384] [--d 512] [--repeats 3]

The floor is the work no implementation can skip, timed with torch.mm in the same run: the four
N×N×D GEMMs (Z = A·Bᵀ in the forward; Z again, G·B and Gᵀ·A in the backward) into preallocated
outputs. Effective GFLOP/s counts those 8·N²·D FLOPs for every implementation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import peers  # noqa: E402

# cpu_deterministic: the cpu backend under torch.use_deterministic_algorithms(True) (fixed reduction order).
IMPLS = ("cpu", "cpu_deterministic", "torch", "reference", "open_clip", "floor")
SIZES, D = (4096, 8192, 16384), 512  # the default sweep: N = M at D


def flops(n: int, d: int) -> int:
    """The FLOPs every implementation is credited with: the floor's four N×N×D GEMMs."""
    return 8 * n * n * d


def make_step(impl: str, n: int, d: int):
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)  # open_clip's logit_scale.exp() at its clamp

    if impl == "floor":
        z, da, db = torch.empty(n, n), torch.empty(n, d), torch.empty(n, d)
        a0, b0 = a.detach(), b.detach()

        def step():
            torch.mm(a0, b0.T, out=z)
            torch.mm(a0, b0.T, out=z)
            torch.mm(z, b0, out=da)
            torch.mm(z.T, a0, out=db)
        return step

    if impl == "open_clip":
        module = peers.open_clip_loss()
        if module is None:
            raise SystemExit("open-clip-torch is not installed")
        loss_fn = module.ClipLoss()
    else:
        import mmfast

        backend = harness.deterministic_backend(impl)
        loss_fn = lambda a, b, s: mmfast.clip_loss(a, b, s, backend=backend)  # noqa: E731

    def step():
        a.grad = b.grad = scale.grad = None
        loss_fn(a, b, scale).backward()
    return step


def worker(mode: str, impl: str, n: int, d: int, repeats: int) -> None:
    result = harness.measure(lambda small: make_step(impl, min(n, 64) if small else n, d), mode, repeats)
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--d", type=int, default=D)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument("--worker", nargs=5, metavar=("MODE", "IMPL", "N", "D", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, impl, n, d, repeats = args.worker
        worker(mode, impl, int(n), int(d), int(repeats))
        return 0

    rows = []
    for n in args.sizes:
        results = {}
        for impl in args.impls:
            print(f"  N={n} D={args.d} {impl} ...", file=sys.stderr, flush=True)
            results[impl] = harness.run_case(__file__, [impl, str(n), str(args.d), str(args.repeats)])
        for impl, r in results.items():
            row = {"impl": impl, "N": n, "D": args.d, **r}
            if "median_s" in r:
                row["gflops"] = flops(n, args.d) / r["median_s"] / 1e9
            if "extra_peak_bytes" in r:
                row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
                for base in ("floor", "open_clip"):
                    if "median_s" in results.get(base, {}):
                        row[f"vs_{base}"] = r["median_s"] / results[base]["median_s"]
            if "extra_peak_bytes" in r and results.get("open_clip", {}).get("extra_peak_bytes", 0) > 0:
                row["mem_vs_open_clip"] = r["extra_peak_bytes"] / results["open_clip"]["extra_peak_bytes"]
            rows.append(row)

    payload = {"bench": "clip_loss fwd+bwd", "device": "cpu", "dtype": "float32", "machine": harness.machine(),
               "flops_counted": "8*N*N*D", "rows": rows}
    harness.report("contrastive-cpu", payload, [
        ("impl", "impl", ""), ("N", "N", "d"), ("median s", "median_s", ".3f"), ("GFLOP/s", "gflops", ".1f"),
        ("extra peak MB", "extra_peak_mb", ".1f"), ("time/floor", "vs_floor", ".2f"),
        ("time/open_clip", "vs_open_clip", ".2f"), ("mem/open_clip", "mem_vs_open_clip", ".3f"), ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
