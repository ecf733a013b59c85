"""Masked-LM loss (linear + cross-entropy, 15% of positions kept) forward+backward on one CUDA
GPU, bf16: mmfast's triton backend against Liger-Kernel's and Cut Cross-Entropy's fused linear
cross-entropy (when installed), torch's chunked F.linear_cross_entropy (when this torch has it),
masked-only torch, and Hugging Face's full logits; the floor is the three bf16 GEMMs over the kept
rows, timed in the same run. No decoder bias (not every peer takes one).

    python benchmarks/bench_gpu_cross_entropy.py [--quick] [--out DIR]

Shapes as benchmarks/bench_cross_entropy.py (bert, xlmr). TFLOP/s counts 6·T_kept·V·Dh for every
implementation. Times are medians of CUDA-event timings; memory is the peak allocated beyond the
inputs. CCE runs with its defaults (gradient filtering on), as a user gets it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from bench_cross_entropy import KEPT, SHAPES  # noqa: E402
from bench_gpu import cuda_time, time_and_memory  # noqa: E402


def loss_fns(kept_rows):
    import mmfast

    fns = {
        "mmfast-triton": lambda h, w, y: mmfast.linear_cross_entropy(h, w, y, backend="triton"),
        "masked_torch": lambda h, w, y: F.cross_entropy(F.linear(h[kept_rows], w).float(), y[kept_rows]),
        "hf_full": lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100),
    }
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        fns["torch_chunked"] = lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        fns["liger"] = lambda h, w, y: liger(w, h, y)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        fns["cce"] = lambda h, w, y: cce(h, w, y, ignore_index=-100)
    except ImportError:
        pass
    return fns


def inputs(t: int, v: int, d: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(t, d, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * d ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (t,), device="cuda", generator=g)
    y[torch.rand(t, device="cuda", generator=g) >= KEPT] = -100
    return h, w, y


def run_case(fn, h, w, y, repeats: int) -> dict:
    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    return time_and_memory(step, [h, w], repeats)


def floor_time(h, w, kept_rows, repeats: int) -> dict:
    hk = h.detach()[kept_rows].contiguous()
    w0 = w.detach()
    x = hk @ w0.T

    def step():
        torch.mm(hk, w0.T, out=x)
        torch.mm(x, w0)
        torch.mm(x.T, hk)

    times = cuda_time(step, 2, repeats)
    return {"times_s": times, "median_s": statistics.median(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the bert shape only, 3 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shapes = ["bert"] if args.quick else list(SHAPES)
    repeats = 3 if args.quick else 7
    rows = []
    for shape in shapes:
        t, v, d = SHAPES[shape]
        h, w, y = inputs(t, v, d)
        kept_rows = torch.nonzero(y != -100).squeeze(1)
        t_kept = kept_rows.numel()
        results = {"floor": floor_time(h, w, kept_rows, repeats)}
        for name, fn in loss_fns(kept_rows).items():
            print(f"  {shape} {name} ...", file=sys.stderr, flush=True)
            results[name] = run_case(fn, h, w, y, repeats)
        for name, r in results.items():
            row = {"impl": name, "shape": shape, "T": t, "T_kept": t_kept, "V": v, "Dh": d, **r}
            if "median_s" in r:
                row["tflops"] = 6 * t_kept * v * d / r["median_s"] / 1e12
                for base in ("floor", "liger", "cce", "torch_chunked", "masked_torch"):
                    if "median_s" in results.get(base, {}):
                        row[f"vs_{base}"] = r["median_s"] / results[base]["median_s"]
            if "extra_peak_bytes" in r:
                row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
            rows.append(row)
        del h, w, y
        torch.cuda.empty_cache()
    machine = {**harness.machine(), "gpu": torch.cuda.get_device_name(0)}
    payload = {"bench": "linear_cross_entropy fwd+bwd, 15% of targets kept, no bias", "device": "cuda",
               "dtype": "bfloat16", "machine": machine, "flops_counted": "6*T_kept*V*Dh", "rows": rows}
    harness.report("cross-entropy-gpu", payload, [
        ("impl", "impl", ""), ("shape", "shape", ""), ("median s", "median_s", ".4f"), ("TFLOP/s", "tflops", ".0f"),
        ("extra MB", "extra_peak_mb", ".0f"), ("/floor", "vs_floor", ".2f"), ("/liger", "vs_liger", ".2f"),
        ("/cce", "vs_cce", ".2f"), ("/torch chunked", "vs_torch_chunked", ".2f"), ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
