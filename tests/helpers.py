"""Shared test helpers: backends that run here, tolerances by dtype, gradients of a loss."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mmfast import _backends

RUNNABLE = [b for b in _backends.BACKENDS if _backends.unavailable_reason(b, torch.device("cpu")) is None]
FUSED = [b for b in RUNNABLE if b != "reference"]

# Triton's CPU interpreter runs a 32×32 tile in milliseconds: the triton backend is tested on CPU
# up to this many multiply-adds per GEMM (N·M·D); larger problems are the gpu tier's.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_MAX_WORK = 300_000


def skip_if_interpreted_and_large(backend: str, n: int, m: int, d: int) -> None:
    if backend == "triton" and INTERPRETED and n * m * d > INTERPRET_MAX_WORK:
        pytest.skip(f"triton under the CPU interpreter: N·M·D = {n * m * d} > {INTERPRET_MAX_WORK} (gpu tier)")


def backend_params(names=_backends.BACKENDS):
    """pytest params for backends; those that cannot run here are skipped with the reason."""
    out = []
    for name in names:
        reason = _backends.unavailable_reason(name, torch.device("cpu"))
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# Quantities that are ~0 by cancellation of larger terms (the loss of a single pair, the gradient
# of a nearly solved batch) carry the terms' fp32 roundoff: below `floor` (0.1 unless given; the
# contrastive tests pass 0.1·scale, the size of the logits), errors are measured against the
# floor, i.e. absolutely.
NORM_FLOOR = 0.1


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = NORM_FLOOR) -> float:
    """‖x − ref‖ / max(‖ref‖, floor), in float64."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(floor)).item()


FP32_TOL = 1e-5


def fp32_tolerances(eager, ref_outputs, tensors):
    """design.md §4: fp32 within 1e-5 relative, or, where PyTorch's own fp32 computation (`eager`:
    the reference backend, F.cross_entropy on full logits) misses that through cancellation (a
    peaked softmax, p − 1 ≈ 0), within 4× PyTorch's error: the fused losses subtract the positive
    logit's term as a separate O(N·D) product, which doubles the terms that cancel. Per output."""
    eager_outputs = loss_and_grads(eager, tensors)
    return [max(FP32_TOL, 4 * rel_err(e, r)) for e, r in zip(eager_outputs, ref_outputs)]


def loss_and_grads(fn, tensors):
    """Runs fn(*tensors) on leaf copies that require grad → [loss, grad of each tensor]."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    return [loss] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def features(n, d, dtype=torch.float32, normalize=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    return x.to(dtype)


MEMORY_PRELUDE = """
import json, sys, torch, mmfast
sys.path.insert(0, {root!r})
from benchmarks.harness import peak_growth
"""


def peak_growth_in_subprocess(script: str, *args) -> int:
    """Runs `script` (which defines warm() and step()) in a fresh process with 2 threads → the
    bytes by which the resident set's peak during step() exceeds the resident set before it
    (benchmarks.harness.peak_growth). A fixed malloc mmap threshold makes glibc return freed blocks
    at once, so the RSS follows what is allocated rather than what the allocator keeps cached."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = MEMORY_PRELUDE.format(root=root) + script + "\nwarm()\nprint(json.dumps(peak_growth(step)))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
