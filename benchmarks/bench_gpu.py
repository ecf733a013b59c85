"""clip_loss forward+backward on one CUDA GPU, bf16: mmfast's triton backend against the reference,
open_clip's ClipLoss, Inf-CL (when installed), and torch.compile of the reference.

    python benchmarks/bench_gpu.py [--quick] [--out DIR]
    python benchmarks/bench_gpu.py --topk [--out DIR]    # topk_similarity instead (see topk_main)

Also measures the machine's bf16 matmul peak (torch.mm, 8192³), so each row's effective TFLOP/s
(8·N²·D counted for every implementation) comes with its ratio to that peak. Times are medians
of CUDA-event timings; memory is torch.cuda.max_memory_allocated over the inputs. An out-of-memory
is recorded as such.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import peers  # noqa: E402


def cuda_time(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def matmul_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = cuda_time(lambda: a @ b, 3, 10)
    return 2 * n**3 / statistics.median(times) / 1e12


def loss_fns():
    import mmfast
    from mmfast.contrastive import reference

    fns = {
        "mmfast-triton": lambda a, b, s: mmfast.clip_loss(a, b, s, backend="triton"),
        "reference": lambda a, b, s: mmfast.clip_loss(a, b, s, backend="reference"),
    }
    oc = peers.open_clip_loss()
    if oc is not None:
        fns["open_clip"] = oc.ClipLoss()
    try:
        from inf_cl import cal_inf_loss

        fns["inf_cl"] = lambda a, b, s: 0.5 * (cal_inf_loss(a, b, scale=s) + cal_inf_loss(b, a, scale=s))
    except ImportError:
        pass
    compiled = torch.compile(lambda a, b, s: reference.clip_loss(a, b, s, None, 0.0, "mean"), dynamic=True)
    fns["compiled-reference"] = compiled
    return fns


def run_case(fn, n: int, d: int, repeats: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).bfloat16().requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).bfloat16().requires_grad_()
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)

    def step():
        a.grad = b.grad = scale.grad = None
        fn(a, b, scale).backward()

    return time_and_memory(step, [a, b, scale], repeats)


def time_and_memory(step, leaves, repeats: int) -> dict:
    """Median CUDA time of step() and its peak memory beyond what existed before; an exception
    (out of memory, a peer's failure) is recorded instead, so one implementation cannot end the run."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        times = cuda_time(step, 1, repeats)
    except Exception as exc:
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        return {"error": "out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.empty_cache()
    return {"times_s": times, "median_s": statistics.median(times),
            "extra_peak_bytes": torch.cuda.max_memory_allocated() - base}


def topk_main(args) -> int:
    """topk_similarity, bf16, N = 10^5 queries × M = 10^6 keys, D = 256, k = 10 (the score matrix
    would be 200 GB): the triton backend against the torch backend (chunked) on the same GPU, and
    their agreement on the first 2048 queries (the full matrix is recorded as the out of memory it is)."""
    import mmfast

    n, m, d, k = (20_000, 200_000, 256, 10) if args.quick else (100_000, 1_000_000, 256, 10)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).bfloat16()
    keys = torch.nn.functional.normalize(torch.randn(m, d, device="cuda", generator=g), dim=1).bfloat16()
    fns = {
        "mmfast-triton": lambda: mmfast.topk_similarity(q, keys, k, backend="triton"),
        "mmfast-torch": lambda: mmfast.topk_similarity(q, keys, k, backend="torch"),
        "full_torch": lambda: torch.topk(q @ keys.T, k, dim=1),
    }
    rows = []
    for name, fn in fns.items():
        print(f"  top-k N={n} M={m} D={d} k={k} {name} ...", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            times = cuda_time(fn, 1, 3)
            row = {"times_s": times, "median_s": statistics.median(times),
                   "extra_peak_bytes": torch.cuda.max_memory_allocated() - base}
            row["tflops"] = 2 * n * m * d / row["median_s"] / 1e12
            row["extra_peak_mb"] = row["extra_peak_bytes"] / 2**20
        except Exception as exc:  # one failing implementation must not end the run
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
            row = {"error": "out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:200]}"}
        torch.cuda.empty_cache()
        rows.append({"impl": name, "N": n, "M": m, "D": d, "k": k, **row})
    sub = q[:2048]
    (v_tr, i_tr), (v_to, i_to) = (mmfast.topk_similarity(sub, keys, k, backend=b) for b in ("triton", "torch"))
    agreement = {"queries": 2048, "max_abs_value_diff": float((v_tr - v_to).abs().max()),
                 "index_match_fraction": float((i_tr == i_to).double().mean())}
    print(f"agreement triton vs torch: {agreement}", flush=True)
    machine = {**harness.machine(), "gpu": torch.cuda.get_device_name(0)}
    payload = {"bench": "topk_similarity", "device": "cuda", "dtype": "bfloat16", "machine": machine,
               "flops_counted": "2*N*M*D", "agreement": agreement, "rows": rows}
    harness.report("similarity-gpu", payload, [
        ("impl", "impl", ""), ("N", "N", "d"), ("M", "M", "d"), ("median s", "median_s", ".4f"),
        ("TFLOP/s", "tflops", ".0f"), ("extra MB", "extra_peak_mb", ".0f"), ("error", "error", ""),
    ], args.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N ∈ {8192, 65536}, D = 512, 3 repeats")
    parser.add_argument("--topk", action="store_true", help="benchmark topk_similarity (bf16, 10^5 × 10^6)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.topk:
        return topk_main(args)
    sizes = [(8192, 512), (65536, 512)] if args.quick else [
        (n, d) for d in (512, 1024) for n in (8192, 32768, 65536, 131072)]
    repeats = 3 if args.quick else 5
    peak = matmul_peak()
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for n, d in sizes:
        results = {}
        for name, fn in loss_fns().items():
            print(f"  N={n} D={d} {name} ...", file=sys.stderr, flush=True)
            results[name] = run_case(fn, n, d, repeats)
        for name, r in results.items():
            row = {"impl": name, "N": n, "D": d, **r}
            if "median_s" in r:
                row["tflops"] = 8 * n * n * d / r["median_s"] / 1e12
                row["of_peak"] = row["tflops"] / peak
                row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
                for base in ("open_clip", "inf_cl"):
                    if "median_s" in results.get(base, {}):
                        row[f"speedup_vs_{base}"] = results[base]["median_s"] / r["median_s"]
                if results.get("open_clip", {}).get("extra_peak_bytes"):
                    row["mem_vs_open_clip"] = r["extra_peak_bytes"] / results["open_clip"]["extra_peak_bytes"]
            rows.append(row)
    machine = {**harness.machine(), "gpu": torch.cuda.get_device_name(0), "bf16_matmul_peak_tflops": peak}
    payload = {"bench": "clip_loss fwd+bwd", "device": "cuda", "dtype": "bfloat16", "machine": machine,
               "flops_counted": "8*N*N*D", "rows": rows}
    harness.report("contrastive-gpu", payload, [
        ("impl", "impl", ""), ("N", "N", "d"), ("D", "D", "d"), ("median s", "median_s", ".4f"),
        ("TFLOP/s", "tflops", ".0f"), ("of peak", "of_peak", ".2f"), ("extra MB", "extra_peak_mb", ".0f"),
        ("x open_clip", "speedup_vs_open_clip", ".2f"), ("x inf_cl", "speedup_vs_inf_cl", ".2f"),
        ("mem/open_clip", "mem_vs_open_clip", ".3f"), ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
