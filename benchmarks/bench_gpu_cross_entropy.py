"""The masked-LM families on one CUDA GPU, bf16, forward + backward (run by benchmarks/bench_gpu.py,
which times them and writes the rows; see its docstring):

- cross_entropy (logits given, every row kept): mmfast's backends, Liger-Kernel's cross-entropy,
  torch.compile of F.cross_entropy. Memory-bound: GB/s count 3·T·V·2 bytes (the logits read by the
  forward and the backward, the gradient written).
- linear_cross_entropy (x = h·wᵀ over the 15% of rows kept, shapes as benchmarks/bench_cross_entropy.py:
  bert, xlmr): mmfast's backends, Liger-Kernel's and Cut Cross-Entropy's fused linear cross-entropy
  (CCE with its defaults, gradient filtering on, as a user gets it), torch's chunked
  F.linear_cross_entropy (when this torch has it), masked-only torch, Hugging Face's full logits,
  torch.compile of the latter, and the floor (the three bf16 GEMMs over the kept rows). TFLOP/s
  count 6·T_kept·V·Dh for every implementation. No decoder bias (not every peer takes one).

    python benchmarks/bench_gpu_cross_entropy.py [--budget S] [--jsonl PATH]   # both families
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_gpu  # noqa: E402
from bench_cross_entropy import KEPT, SHAPES  # noqa: E402
from bench_gpu import Case, training_step  # noqa: E402

CROSS_ENTROPY_SIZES = [(8192, 32768)]  # (T, V): a 512 MiB bf16 logits tensor
LINEAR_SHAPES = ("bert", "xlmr")


def cross_entropy_cases() -> Iterator[Case]:
    import mmfast

    for t, v in CROSS_ENTROPY_SIZES:
        g = torch.Generator(device=bench_gpu.DEVICE).manual_seed(5)
        x = (torch.randn(t, v, device=bench_gpu.DEVICE, generator=g) * 2).bfloat16().requires_grad_()
        y = torch.randint(0, v, (t,), device=bench_gpu.DEVICE, generator=g)
        fns = {f"mmfast-{backend}": (lambda x, y, backend=backend: mmfast.cross_entropy(x, y, backend=backend))
               for backend in bench_gpu.backends()}
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            fns["liger"] = LigerCrossEntropyLoss()
        except ImportError:
            pass
        fns[bench_gpu.COMPILED] = bench_gpu._compiled(lambda x, y: F.cross_entropy(x.float(), y))
        impls = {name: training_step(fn, [x], x, y) for name, fn in fns.items()}
        yield Case({"T": t, "V": v}, bench_gpu._floor_second(impls), [x], {"bytes": 3 * t * v * 2})


def linear_cross_entropy_cases() -> Iterator[Case]:
    for shape in LINEAR_SHAPES:
        t, v, d = SHAPES[shape]
        h, w, y = _inputs(t, v, d)
        kept_rows = torch.nonzero(y != -100).squeeze(1)
        t_kept = kept_rows.numel()
        impls = {name: training_step(fn, [h, w], h, w, y) for name, fn in _linear_fns(kept_rows).items()}
        impls["floor"] = _floor(h, w, kept_rows)
        yield Case({"shape": shape, "T": t, "T_kept": t_kept, "V": v, "Dh": d}, bench_gpu._floor_second(impls),
                   [h, w], {"flops": 6 * t_kept * v * d})


def _linear_fns(kept_rows):
    import mmfast

    fns = {f"mmfast-{backend}": (lambda h, w, y, backend=backend: mmfast.linear_cross_entropy(h, w, y, backend=backend))
           for backend in bench_gpu.backends()}
    fns["masked_torch"] = lambda h, w, y: F.cross_entropy(F.linear(h[kept_rows], w).float(), y[kept_rows])
    fns["hf_full"] = lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
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
    fns[bench_gpu.COMPILED] = bench_gpu._compiled(fns["hf_full"])
    return fns


def _inputs(t: int, v: int, d: int):
    device = bench_gpu.DEVICE
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(t, d, device=device, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) * d ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (t,), device=device, generator=g)
    y[torch.rand(t, device=device, generator=g) >= KEPT] = -100
    return h, w, y


def _floor(h, w, kept_rows):
    """The three GEMMs over the kept rows: X = H·Wᵀ, then G·W and Gᵀ·H with X standing in for G."""
    hk, w0 = h.detach()[kept_rows].contiguous(), w.detach()
    x = hk @ w0.T

    def step():
        torch.mm(hk, w0.T, out=x)
        torch.mm(x, w0)
        torch.mm(x.T, hk)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args(argv)
    options = ["--budget", str(args.budget)] + (["--jsonl", args.jsonl] if args.jsonl else [])
    return int(any([bench_gpu.main([family, *options]) for family in ("cross_entropy", "linear_cross_entropy")]))


if __name__ == "__main__":
    sys.exit(main())
