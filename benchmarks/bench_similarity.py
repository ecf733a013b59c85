"""topk_similarity on CPU, fp32: mmfast's backends against full torch (the score matrix, then
torch.topk) and the floor (the bare matmul alone, into a preallocated output).

    python benchmarks/bench_similarity.py [--n 4096] [--m 262144 ...] [--d 256] [--k 10] [--repeats 3]
    python benchmarks/bench_similarity.py --quick

The default shape is issue 5's acceptance shape: 4096 queries against 262144 keys, D = 256, k = 10
(the full matrix is 4 GiB); several --m values make a sweep over the number of keys. Every case
runs in fresh processes (harness.py): time = median of warm repeats, memory = growth of the peak
RSS over one call (the inputs already exist; the matmul's preallocated output is first touched
inside the call, so it counts). GFLOP/s count 2·N·M·D for every implementation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402

IMPLS = ("cpu", "torch", "full_torch", "matmul")
N, M, D, K = 4096, 262144, 256, 10  # the default shape


def flops(n: int, m: int, d: int, k: int) -> int:
    """The FLOPs every implementation is credited with: the floor's N×M×D matmul."""
    return 2 * n * m * d


def make_step(impl: str, n: int, m: int, d: int, k: int):
    g = torch.Generator().manual_seed(0)
    # normalised in place: a temporary copy of the keys would raise the peak RSS above what the
    # op adds, and the growth of the peak would then read 0
    q = torch.randn(n, d, generator=g)
    keys = torch.randn(m, d, generator=g)
    q /= q.norm(dim=1, keepdim=True)
    keys /= keys.norm(dim=1, keepdim=True)
    if impl == "matmul":
        out = torch.empty(n, m)
        return lambda: torch.mm(q, keys.T, out=out)
    if impl == "full_torch":
        return lambda: torch.topk(q @ keys.T, k, dim=1)
    import mmfast

    return lambda: mmfast.topk_similarity(q, keys, k, backend=impl)


def worker(mode: str, impl: str, n: int, m: int, d: int, k: int, repeats: int) -> None:
    def build(tiny: bool):  # tiny: a small call that warms up imports and code paths
        return make_step(impl, min(n, 64), min(m, 4096), d, min(k, 64)) if tiny else make_step(impl, n, m, d, k)

    result = harness.measure(build, mode, repeats)
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--m", type=int, nargs="+", default=[M], help="keys; several make a sweep")
    parser.add_argument("--d", type=int, default=D)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke test: N=512, M=16384, D=64, 2 repeats")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument("--worker", nargs=7, metavar=("MODE", "IMPL", "N", "M", "D", "K", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, impl, *sizes = args.worker
        worker(mode, impl, *map(int, sizes))
        return 0
    if args.quick:
        args.n, args.m, args.d, args.repeats = 512, [16384], 64, 2

    n, d, k = args.n, args.d, args.k
    rows = []
    for m in args.m:
        results = {}
        for impl in args.impls:
            print(f"  N={n} M={m} D={d} k={k} {impl} ...", file=sys.stderr, flush=True)
            results[impl] = harness.run_case(__file__, [impl, str(n), str(m), str(d), str(k), str(args.repeats)])
        for impl, r in results.items():
            row = {"impl": impl, "N": n, "M": m, "D": d, "k": k, **r}
            if "median_s" in r:
                row["gflops"] = flops(n, m, d, k) / r["median_s"] / 1e9
                for base in ("full_torch", "matmul"):
                    if "median_s" in results.get(base, {}):
                        row[f"vs_{base}"] = r["median_s"] / results[base]["median_s"]
            if "extra_peak_bytes" in r:
                row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
                if results.get("full_torch", {}).get("extra_peak_bytes", 0) > 0:
                    row["mem_vs_full_torch"] = r["extra_peak_bytes"] / results["full_torch"]["extra_peak_bytes"]
            rows.append(row)

    payload = {"bench": "topk_similarity", "device": "cpu", "dtype": "float32", "machine": harness.machine(),
               "flops_counted": "2*N*M*D", "rows": rows}
    harness.report("similarity-cpu", payload, [
        ("impl", "impl", ""), ("M", "M", "d"), ("median s", "median_s", ".3f"), ("GFLOP/s", "gflops", ".1f"),
        ("extra peak MB", "extra_peak_mb", ".1f"), ("time/full_torch", "vs_full_torch", ".2f"),
        ("time/matmul", "vs_matmul", ".2f"), ("mem/full_torch", "mem_vs_full_torch", ".4f"), ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
