"""Every op family on one CUDA GPU, bf16: mmfast's backends that run on CUDA (cuda, triton, torch,
reference), the peers that are installed (open_clip, Inf-CL, Liger-Kernel, Cut Cross-Entropy),
torch.compile of the reference, and the floor (the GEMMs the op must do, timed with torch.mm).

    python benchmarks/bench_gpu.py FAMILY [--budget S] [--jsonl PATH]    # all but torch.compile
    python benchmarks/bench_gpu.py compiled [--budget S] [--jsonl PATH]  # torch.compile, family by family
    python benchmarks/bench_gpu.py machine [--jsonl PATH]   # the GPU, versions, bf16 matmul peak
    python benchmarks/bench_gpu.py report --jsonl PATH      # tables and one JSON of a run's rows (+ PNGs)
    python benchmarks/bench_gpu.py plot --json REPORT       # a PNG per family from a report JSON

FAMILY: clip, siglip, infonce (forward + backward), cross_entropy, linear_cross_entropy (forward +
backward; benchmarks/bench_gpu_cross_entropy.py), similarity, topk (forward). torch.compile's rows
run apart (`compiled`), since compiling takes tens of seconds a case. benchmarks/gpu_check.sh runs
them all, each under its own timeout, into one JSONL file.

Each row is appended to the JSONL file (default: $OUT/gpu-bench.jsonl, else benchmarks/results/) as
soon as it is measured; a case that cannot start within the budget (seconds since the process
started) is written as skipped. Times: medians of CUDA-event timings after one warm-up call (which
autotunes and compiles); memory: peak allocated beyond what existed before the timed calls, reset
after the warm-up (harness.gpu_measure). TFLOP/s count the same FLOPs for every implementation
(`flops` in each row, e.g. 8·N·M·D for a contrastive loss, the minimum for one that does not keep Z).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import peers  # noqa: E402
import plots  # noqa: E402

DEVICE = "cuda"
REPEATS = 5
COMPILED = "compiled-reference"
# A case is started only with this many seconds of the budget left (torch.compile's first call
# compiles the forward and backward graphs).
RESERVE_S = {COMPILED: 20.0}
DEFAULT_RESERVE_S = 6.0
# The families whose torch.compile rows `compiled` measures, most wanted first.
COMPILED_ORDER = ("clip", "linear_cross_entropy", "cross_entropy", "siglip", "infonce", "similarity")
# Sizes, bf16, chosen so that each family's step fits its time budget in gpu_check.sh.
CLIP_SIZES = [(16384, 512), (65536, 512)]  # (N = M, D)
SIGLIP_SIZES = [(16384, 512)]
INFONCE_SIZES = [(4096, 65536, 512), (32768, 32768, 512)]  # (N, M, D): few queries, many keys first
SIMILARITY_SIZES = [(32768, 32768, 512)]
TOPK_SIZES = [(32768, 1_000_000, 256, 10)]  # (N, M, D, k): the scores would be 64 GiB in bf16
TOPK_CHUNK, AGREEMENT_QUERIES = 65536, 2048


@dataclasses.dataclass
class Case:
    """One size of a family: its implementations as no-argument steps (each drops the leaves'
    gradients first), the leaves whose gradients they make, and the work every step counts."""
    sizes: dict
    impls: dict[str, Callable[[], object]]
    leaves: list
    work: dict  # {"flops": n} or {"bytes": n}
    repeats: int = REPEATS


def training_step(fn, leaves, *args):
    """A step: drop the leaves' gradients, then fn(*args).backward()."""
    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*args).backward()
    return step


def _normalized(n: int, d: int, g: torch.Generator, grad: bool = True) -> torch.Tensor:
    x = F.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1).bfloat16()
    return x.requires_grad_(grad)


def contrastive_floor(a, b):
    """The four GEMM passes a fused contrastive loss must do (Z, then Z again, G·B and Gᵀ·A in the
    backward), with Z standing in for G: 8·N·M·D FLOPs."""
    a, b = a.detach(), b.detach()
    z = a @ b.T

    def step():
        torch.mm(a, b.T, out=z)
        torch.mm(a, b.T, out=z)
        torch.mm(z, b)
        torch.mm(z.T, a)
    return step


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def clip_cases() -> Iterator[Case]:
    import mmfast
    from mmfast.contrastive import reference

    oc = peers.open_clip_loss()
    for n, d in CLIP_SIZES:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        a, b = _normalized(n, d, g), _normalized(n, d, g)
        s = torch.tensor(100.0, device=DEVICE, requires_grad=True)
        leaves = [a, b, s]
        fns = {f"mmfast-{backend}": (lambda a, b, s, backend=backend: mmfast.clip_loss(a, b, s, backend=backend))
               for backend in backends()}
        if oc is not None:
            fns["open_clip"] = oc.ClipLoss()
        inf_cl = _inf_cl()
        if inf_cl is not None:
            fns["inf_cl"] = lambda a, b, s: 0.5 * (inf_cl(a, b, scale=s) + inf_cl(b, a, scale=s))
        fns[COMPILED] = _compiled(lambda a, b, s: reference.clip_loss(a, b, s, None, 0.0, "mean"))
        impls = {name: training_step(fn, leaves, a, b, s) for name, fn in fns.items()}
        impls["floor"] = contrastive_floor(a, b)
        yield Case({"N": n, "M": n, "D": d}, _floor_second(impls), leaves, {"flops": 8 * n * n * d})


def siglip_cases() -> Iterator[Case]:
    import mmfast
    from mmfast.contrastive import reference

    oc = peers.open_clip_loss()
    for n, d in SIGLIP_SIZES:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        a, b = _normalized(n, d, g), _normalized(n, d, g)
        s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
        bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
        leaves = [a, b, s, bias]
        fns = {f"mmfast-{backend}": (lambda a, b, s, bias, backend=backend:
                                     mmfast.siglip_loss(a, b, s, bias, backend=backend))
               for backend in backends()}
        if oc is not None:
            fns["open_clip"] = oc.SigLipLoss()
        fns[COMPILED] = _compiled(reference.siglip_loss)
        impls = {name: training_step(fn, leaves, a, b, s, bias) for name, fn in fns.items()}
        impls["floor"] = contrastive_floor(a, b)
        yield Case({"N": n, "M": n, "D": d}, _floor_second(impls), leaves, {"flops": 8 * n * n * d})


def infonce_cases() -> Iterator[Case]:
    """A small local batch of queries against many keys (the case the stats kernel's column splits
    are for), then a square one."""
    import mmfast
    from mmfast.contrastive import reference

    inf_cl = _inf_cl()
    for n, m, d in INFONCE_SIZES:
        g = torch.Generator(device=DEVICE).manual_seed(2)
        q, k = _normalized(n, d, g), _normalized(m, d, g)
        s = torch.tensor(50.0, device=DEVICE, requires_grad=True)
        labels = torch.arange(n, device=DEVICE)
        leaves = [q, k, s]
        fns = {f"mmfast-{backend}": (lambda q, k, s, backend=backend:
                                     mmfast.infonce_loss(q, k, s, labels=labels, backend=backend))
               for backend in backends()}
        if inf_cl is not None:
            fns["inf_cl"] = lambda q, k, s: inf_cl(q, k, labels=labels, scale=s)
        fns[COMPILED] = _compiled(lambda q, k, s: reference.infonce_loss(q, k, s, labels, None, 0.0, "mean"))
        impls = {name: training_step(fn, leaves, q, k, s) for name, fn in fns.items()}
        impls["floor"] = contrastive_floor(q, k)
        yield Case({"N": n, "M": m, "D": d}, _floor_second(impls), leaves, {"flops": 8 * n * m * d})


def similarity_cases() -> Iterator[Case]:
    import mmfast
    from mmfast.similarity import reference

    for n, m, d in SIMILARITY_SIZES:
        g = torch.Generator(device=DEVICE).manual_seed(3)
        a = torch.randn(n, d, device=DEVICE, generator=g).bfloat16()
        b = torch.randn(m, d, device=DEVICE, generator=g).bfloat16()
        scale = torch.tensor(1.0, device=DEVICE)
        impls = {f"mmfast-{backend}": (lambda backend=backend: mmfast.similarity(a, b, normalize=True, backend=backend))
                 for backend in backends()}
        out = torch.empty(n, m, device=DEVICE, dtype=torch.bfloat16)
        impls["floor"] = lambda: torch.mm(a, b.T, out=out)
        compiled = _compiled(lambda a, b: reference.similarity(a, b, scale, True, torch.bfloat16))
        impls[COMPILED] = lambda: compiled(a, b)
        yield Case({"N": n, "M": m, "D": d}, _floor_second(impls), [], {"flops": 2 * n * m * d})


def topk_cases() -> Iterator[Case]:
    """Each query's k best keys, against the floor: the same scores by torch.mm in key chunks."""
    import mmfast

    for n, m, d, k in TOPK_SIZES:
        g = torch.Generator(device=DEVICE).manual_seed(4)
        q, keys = _normalized(n, d, g, grad=False), _normalized(m, d, g, grad=False)
        impls = {f"mmfast-{backend}": (lambda backend=backend: mmfast.topk_similarity(q, keys, k, backend=backend))
                 for backend in backends()}
        out = torch.empty(n, TOPK_CHUNK, device=DEVICE, dtype=torch.bfloat16)

        def floor():
            for c0 in range(0, m, TOPK_CHUNK):
                block = keys[c0:c0 + TOPK_CHUNK]
                torch.mm(q, block.T, out=out[:, :block.shape[0]])
        impls["floor"] = floor
        yield Case({"N": n, "M": m, "D": d, "k": k}, _floor_second(impls), [], {"flops": 2 * n * m * d}, repeats=3)


def topk_agreement(log: harness.RowLog) -> None:
    """Each fused backend against torch on the first queries of the first top-k case."""
    import mmfast

    n, m, d, k = TOPK_SIZES[0]
    g = torch.Generator(device=DEVICE).manual_seed(4)
    q, keys = _normalized(n, d, g, grad=False)[:AGREEMENT_QUERIES], _normalized(m, d, g, grad=False)
    v_to, i_to = mmfast.topk_similarity(q, keys, k, backend="torch")
    for backend in set(backends()) & {"cuda", "triton"}:
        v, i = mmfast.topk_similarity(q, keys, k, backend=backend)
        log.write({"family": "topk", "kind": "agreement", "backend": backend, "queries": q.shape[0],
                   "max_abs_value_diff": float((v - v_to).abs().max()),
                   "index_match_fraction": float((i == i_to).double().mean())})


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None
    return cal_inf_loss


def backends() -> tuple[str, ...]:
    """mmfast's backends that run on this GPU, fused ones first (cuda needs kernels/build.py's library)."""
    from mmfast import _backends

    return tuple(b for b in ("cuda", "triton", "torch", "reference")
                 if _backends.unavailable_reason(b, torch.device(DEVICE)) is None)


def _floor_second(impls: dict) -> dict:
    """mmfast's fused backends first (cuda, triton), the floor next (so they land before a timeout),
    then the rest in order, torch.compile last (its compile takes the longest)."""
    first = ["mmfast-cuda", "mmfast-triton", "floor"]
    order = first + [n for n in impls if n not in first + [COMPILED]]
    return {name: impls[name] for name in order + [COMPILED] if name in impls}


def families() -> dict[str, Callable[[], Iterator[Case]]]:
    import bench_gpu_cross_entropy as mlm

    return {"clip": clip_cases, "siglip": siglip_cases, "infonce": infonce_cases,
            "cross_entropy": mlm.cross_entropy_cases, "linear_cross_entropy": mlm.linear_cross_entropy_cases,
            "similarity": similarity_cases, "topk": topk_cases}


def run_family(family: str, budget: harness.Budget, log: harness.RowLog, compiled: bool = False) -> int:
    """Measures every case of the family (compiled: only torch.compile's rows; else all others), one
    row per implementation as it finishes → the number of mmfast's rows that failed (an exception
    other than out of memory; a peer's failure is only recorded)."""
    failed = 0
    for case in families()[family]():
        for impl, step in case.impls.items():
            if (impl == COMPILED) != compiled:
                continue
            row = {"family": family, "impl": impl, "dtype": "bfloat16", **case.sizes, **case.work}
            reserve = RESERVE_S.get(impl, DEFAULT_RESERVE_S)
            if budget.left() < reserve:
                row["skipped"] = f"time budget: {budget.left():.0f} s left, a case needs {reserve:.0f}"
            else:
                print(f"  {family} {case.sizes} {impl} ...", file=sys.stderr, flush=True)
                row.update(harness.gpu_measure(step, case.leaves, case.repeats))
            if "median_s" in row:
                if "flops" in row:
                    row["tflops"] = row["flops"] / row["median_s"] / 1e12
                else:
                    row["gbps"] = row["bytes"] / row["median_s"] / 1e9
            failed += impl.startswith("mmfast-") and row.get("error", "out of memory") != "out of memory"
            log.write(row)
        del case
        torch.cuda.empty_cache()
    if family == "topk" and not compiled and budget.left() > DEFAULT_RESERVE_S:
        topk_agreement(log)
    return failed


def machine_row() -> dict:
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ a
    times = harness.cuda_time(lambda: a @ a, 10)
    props = torch.cuda.get_device_properties(0)
    return {"kind": "machine", **harness.machine(), "gpu": props.name, "sms": props.multi_processor_count,
            "gpu_memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda, "triton": triton.__version__,
            "bf16_matmul_peak_tflops": 2 * 8192**3 / statistics.median(times) / 1e12}


# ---- the report: ratios within a run ----------------------------------------------------------

def report(log: harness.RowLog) -> Path:
    """Prints each family's rows as a table, with each row's time relative to the floor, the
    reference backend and the best peer of the same case, and writes them as one JSON beside the
    JSONL file."""
    rows = log.rows()
    machine = next((r for r in rows if r.get("kind") == "machine"), {})
    results = [r for r in rows if "impl" in r]
    peer_names = {"open_clip", "inf_cl", "liger", "cce", "torch_chunked", COMPILED}
    for row in results:
        same = [r for r in results if r["family"] == row["family"] and _sizes(r) == _sizes(row) and "median_s" in r]
        by_impl = {r["impl"]: r["median_s"] for r in same}
        if "median_s" not in row:
            continue
        for base in ("floor", "mmfast-reference"):
            if base in by_impl:
                row[f"x_{base}"] = row["median_s"] / by_impl[base]
        peer_times = [t for name, t in by_impl.items() if name in peer_names]
        if peer_times:
            row["x_best_peer"] = row["median_s"] / min(peer_times)
        if "bf16_matmul_peak_tflops" in machine and "tflops" in row:
            row["of_peak"] = row["tflops"] / machine["bf16_matmul_peak_tflops"]
    columns = [("family", "family", ""), ("impl", "impl", ""), ("sizes", "sizes", ""), ("median s", "median_s", ".4f"),
               ("TFLOP/s", "tflops", ".0f"), ("GB/s", "gbps", ".0f"), ("extra MiB", "extra_mib", ".0f"),
               ("/floor", "x_floor", ".2f"), ("/reference", "x_mmfast-reference", ".2f"),
               ("/best peer", "x_best_peer", ".2f"), ("note", "note", "")]
    for row in results:
        row["sizes"] = " ".join(f"{k}={v}" for k, v in _sizes(row).items())
        if "extra_peak_bytes" in row:
            row["extra_mib"] = row["extra_peak_bytes"] / 2**20
        row["note"] = row.get("error") or row.get("skipped") or ""
    if machine:
        print({k: machine[k] for k in ("gpu", "torch", "triton", "bf16_matmul_peak_tflops") if k in machine})
    print(harness.table(results, columns))
    for row in rows:
        if row.get("kind") == "agreement":
            print(f"top-k agreement, {row.get('backend', 'triton')} vs torch: {row}")
    out = log.path.with_suffix(".json")
    out.write_text(json.dumps({"bench": "gpu_check", "device": "cuda", "dtype": "bfloat16", "machine": machine,
                               "rows": results, "other": [r for r in rows if "impl" not in r and r is not machine]},
                              indent=2))
    print(f"\nwritten {out}")
    try:
        for png in plots.gpu_report(out):
            print(f"written {png}")
    except ImportError:
        print(f"matplotlib is not installed: plot later with `python benchmarks/bench_gpu.py plot --json {out}`")
    return out


def _sizes(row: dict) -> dict:
    return {k: row[k] for k in ("shape", "T", "V", "N", "M", "D", "Dh", "k") if k in row}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["machine", "report", "plot", "compiled", "clip", "siglip", "infonce",
                                         "cross_entropy", "linear_cross_entropy", "similarity", "topk"])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds, from the process's start")
    parser.add_argument("--jsonl", default=None)
    parser.add_argument("--json", default=None, help="plot: a report JSON (gpu-check-STAMP.json)")
    args = parser.parse_args(argv)
    if args.what == "plot":
        if not args.json:
            parser.error("plot needs --json REPORT")
        for png in plots.gpu_report(Path(args.json)):
            print(f"written {png}")
        return 0
    default = Path(os.environ.get("OUT") or harness.RESULTS) / "gpu-bench.jsonl"
    log = harness.RowLog(args.jsonl or default)
    if args.what == "report":
        report(log)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    if args.what == "machine":
        row = machine_row()
        print(row)
        log.write(row)
        return 0
    budget = harness.Budget(args.budget)
    if args.what == "compiled":
        return 1 if sum(run_family(family, budget, log, compiled=True) for family in COMPILED_ORDER) else 0
    return 1 if run_family(args.what, budget, log) else 0


if __name__ == "__main__":
    sys.exit(main())
