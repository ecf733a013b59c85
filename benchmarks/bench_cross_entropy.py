"""Masked-LM loss (linear + cross-entropy, 15% of positions kept) forward+backward on CPU, fp32:
mmfast's backends against the ways a model computes it without mmfast, and the floor.

    python benchmarks/bench_cross_entropy.py [--shapes bert xlmr] [--repeats 3]
    python benchmarks/bench_cross_entropy.py --tokens 2048 4096 8192 [--vocab 30522] [--dh 768]

Shapes: bert = BERT-base MLM (T = 16 × 512 = 8192 positions, V = 30522, Dh = 768), xlmr = XLM-R
(T = 4096, V = 250002, Dh = 768); --tokens sweeps T at one V and Dh (default BERT's) instead. The
decoder has a bias, as BERT's does. Implementations:
  hf_full       F.linear over all T rows, then F.cross_entropy(ignore_index=-100) (Hugging Face's way)
  masked_torch  the kept rows gathered first, then F.linear + F.cross_entropy on them
  torch_chunked torch's own F.linear_cross_entropy with LinearCrossEntropyOptions() (chunked)
  cpu, torch    mmfast.linear_cross_entropy with that backend
  floor         the three GEMMs over the kept rows that any implementation must do (logits,
                dH = G·W, dW = Gᵀ·H), timed with torch.mm into preallocated outputs
GFLOP/s counts 6·T_kept·V·Dh for every implementation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402

SHAPES = {"bert": (8192, 30522, 768), "xlmr": (4096, 250002, 768)}
KEPT = 0.15
# cpu_deterministic: the cpu backend under torch.use_deterministic_algorithms(True) (fixed reduction order).
IMPLS = ("cpu", "cpu_deterministic", "torch", "masked_torch", "torch_chunked", "hf_full", "floor")


def targets(t: int, v: int) -> torch.Tensor:
    """The MLM targets: a random class for KEPT of the T rows, ignore_index (-100) for the rest. A
    generator of their own, so that which rows are kept does not depend on the other inputs' sizes."""
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, v, (t,), generator=g)
    target[torch.rand(t, generator=g) >= KEPT] = -100
    return target


def inputs(t: int, v: int, d: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(t, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d ** -0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_()
    return h, w, b, targets(t, v)


def kept_rows(t: int, v: int) -> int:
    """T_kept: the rows whose target is not ignored, as the workers draw them."""
    return int((targets(t, v) != -100).sum())


def flops(t: int, v: int, d: int) -> int:
    """The FLOPs every implementation is credited with: the floor's three GEMMs over the kept rows."""
    return 6 * kept_rows(t, v) * v * d


def make_step(impl: str, t: int, v: int, d: int):
    h, w, b, target = inputs(t, v, d)
    kept = torch.nonzero(target != -100).squeeze(1)

    if impl == "floor":
        hk = h.detach()[kept].contiguous()
        x, dh, dw = torch.empty(len(kept), v), torch.empty(len(kept), d), torch.empty(v, d)
        w0 = w.detach()

        def step():
            torch.mm(hk, w0.T, out=x)
            torch.mm(x, w0, out=dh)
            torch.mm(x.T, hk, out=dw)
        return step

    if impl == "hf_full":
        def loss_fn():
            return F.cross_entropy(F.linear(h, w, b), target, ignore_index=-100)
    elif impl == "masked_torch":
        def loss_fn():
            return F.cross_entropy(F.linear(h[kept], w, b), target[kept])
    elif impl == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def loss_fn():
            return F.linear_cross_entropy(h, w, target, linear_bias=b, ignore_index=-100, options=options)
    else:
        import mmfast

        backend = harness.deterministic_backend(impl)

        def loss_fn():
            return mmfast.linear_cross_entropy(h, w, target, bias=b, backend=backend)

    def step():
        h.grad = w.grad = b.grad = None
        loss_fn().backward()
    return step


def worker(mode: str, impl: str, t: int, v: int, d: int, repeats: int) -> None:
    result = harness.measure(lambda small: make_step(impl, *((64, 1000, 64) if small else (t, v, d))), mode, repeats)
    print(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    sizes.add_argument("--tokens", type=int, nargs="+", metavar="T",
                       help="a sweep over T (positions, 15%% kept) at --vocab and --dh, instead of --shapes")
    parser.add_argument("--vocab", type=int, default=SHAPES["bert"][1], help="V of a --tokens sweep (default: BERT's)")
    parser.add_argument("--dh", type=int, default=SHAPES["bert"][2], help="Dh of a --tokens sweep (default: BERT's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument("--worker", nargs=6, metavar=("MODE", "IMPL", "T", "V", "DH", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, impl, *sizes = args.worker
        worker(mode, impl, *map(int, sizes))
        return 0

    cases = ([(f"T={t}", t, args.vocab, args.dh) for t in args.tokens] if args.tokens
             else [(shape, *SHAPES[shape]) for shape in args.shapes])
    rows = []
    for shape, t, v, d in cases:
        results = {}
        for impl in args.impls:
            print(f"  T={t} V={v} Dh={d} {impl} ...", file=sys.stderr, flush=True)
            results[impl] = harness.run_case(__file__, [impl, str(t), str(v), str(d), str(args.repeats)])
        for impl, r in results.items():
            row = {"impl": impl, "shape": shape, "T": t, "T_kept": kept_rows(t, v), "V": v, "Dh": d, **r}
            if "median_s" in r:
                row["gflops"] = flops(t, v, d) / r["median_s"] / 1e9
                for base in ("floor", "masked_torch", "torch_chunked"):
                    if "median_s" in results.get(base, {}):
                        row[f"vs_{base}"] = r["median_s"] / results[base]["median_s"]
            if "extra_peak_bytes" in r:
                row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
                for base in ("masked_torch", "torch_chunked"):
                    if results.get(base, {}).get("extra_peak_bytes", 0) > 0:
                        row[f"mem_vs_{base}"] = r["extra_peak_bytes"] / results[base]["extra_peak_bytes"]
            rows.append(row)

    payload = {"bench": "linear_cross_entropy fwd+bwd, 15% of targets kept", "device": "cpu", "dtype": "float32",
               "machine": harness.machine(), "flops_counted": "6*T_kept*V*Dh", "rows": rows}
    harness.report("cross-entropy-cpu", payload, [
        ("impl", "impl", ""), ("shape", "shape", ""), ("median s", "median_s", ".3f"), ("GFLOP/s", "gflops", ".1f"),
        ("extra peak MB", "extra_peak_mb", ".1f"), ("time/floor", "vs_floor", ".2f"),
        ("time/masked", "vs_masked_torch", ".2f"), ("time/chunked", "vs_torch_chunked", ".2f"),
        ("mem/masked", "mem_vs_masked_torch", ".3f"), ("mem/chunked", "mem_vs_torch_chunked", ".3f"),
        ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
