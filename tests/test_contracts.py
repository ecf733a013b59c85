"""What every op family promises beyond its values: first-order gradients only (said plainly),
torch.func refused plainly, raw registered ops that validate their inputs (no process crash), and
bit-for-bit repeatable results under torch.use_deterministic_algorithms(True)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import _backends
from tests import oracle
from tests.helpers import FP32_TOL, backend_params, features, loss_and_grads, rel_err

KERNELS = backend_params(["torch", "cpu", "triton"])


def targets(t, v, seed=0):
    y = torch.randint(0, v, (t,), generator=torch.Generator().manual_seed(seed))
    y[::5] = -100
    return y


# Each op as a loss of its differentiable inputs (small: the triton backend runs interpreted here).
def op_cases(backend):
    a, b, h, w = features(9, 6), features(7, 6), torch.randn(9, 6), torch.randn(40, 6)
    y = targets(9, 40)
    return {
        "clip_loss": (lambda a, b: mmfast.clip_loss(a, b, 5.0, backend=backend), [a, features(9, 6)]),
        "infonce_loss": (lambda a, b: mmfast.infonce_loss(a, b, 5.0, labels=torch.arange(9) % 7, backend=backend),
                         [a, b]),
        "siglip_loss": (lambda a, b: mmfast.siglip_loss(a, b, 5.0, -1.0, backend=backend), [a, features(9, 6)]),
        "similarity": (lambda a, b: (mmfast.similarity(a, b, normalize=True, backend=backend) ** 2).sum(), [a, b]),
        "cross_entropy": (lambda x: mmfast.cross_entropy(x, y, backend=backend), [torch.randn(9, 40)]),
        "linear_cross_entropy": (lambda h, w: mmfast.linear_cross_entropy(h, w, y, backend=backend), [h, w]),
        "linear_cross_entropy-none": (
            lambda h, w: mmfast.linear_cross_entropy(h, w, y, reduction="none", backend=backend).sum(), [h, w]),
    }


OPS = list(op_cases("torch"))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_second_order_gradients_raise_plainly(backend, op):
    """Backward through a gradient taken with create_graph=True: a clear error, never a silent zero
    or missing gradient (the fused masked-LM path returned no gradient and no error)."""
    fn, tensors = op_cases(backend)[op]
    leaves = [t.clone().requires_grad_() for t in tensors]
    grads = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        sum((g * g).sum() for g in grads).backward()


@pytest.mark.parametrize("backend", KERNELS)
def test_create_graph_for_other_parts_still_gives_first_order_gradients(backend):
    """create_graph=True for the sake of another term (a gradient penalty elsewhere) is fine as long
    as nothing backpropagates through our gradients."""
    fn, tensors = op_cases(backend)["linear_cross_entropy"]
    leaves = [t.clone().requires_grad_() for t in tensors]
    got = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    expected = loss_and_grads(fn, tensors)[1:]
    for g, e in zip(got, expected):
        assert rel_err(g, e) < FP32_TOL


@pytest.mark.parametrize("op", OPS)
def test_torch_func_is_refused_plainly(op):
    fn, tensors = op_cases("torch")[op]
    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        torch.func.grad(fn)(*tensors)


# ---------------------------------------------------------------- the raw registered ops

RAW_CALLS = r"""
import json, torch, mmfast
ops = torch.ops.mmfast
f, e, i = torch.randn(3, 4), torch.empty(0, 4), torch.zeros(3, dtype=torch.long)
calls = {
    "topk, empty queries": lambda: ops.cpu_topk_similarity(e, f, 1, 1.0, False),
    "topk, k > M": lambda: ops.cpu_topk_similarity(f, f, 4, 1.0, False),
    "topk, 1-D a": lambda: ops.cpu_topk_similarity(f[0], f, 1, 1.0, False),
    "similarity, float64": lambda: ops.cpu_similarity(f.double(), f.double(), 1.0, False, torch.float32),
    "similarity, D mismatch": lambda: ops.cpu_similarity(f, f[:, :3], 1.0, False, torch.float32),
    "stats, empty queries": lambda: ops.cpu_contrastive_stats(e, f, 1.0, 0.0, None, False, True),
    "stats, int features": lambda: ops.cpu_contrastive_stats(i[:, None].expand(3, 4), f, 1.0, 0.0, None, False, True),
    "stats, short positives": lambda: ops.cpu_contrastive_stats(f, f, 1.0, 0.0, i[:2], True, False),
    "grad, short row": lambda: ops.cpu_contrastive_grad(f, f, 1.0, 0.0, None, False, torch.zeros(2, dtype=torch.double),
                                                        torch.zeros(3, dtype=torch.double), torch.ones(3), torch.ones(3),
                                                        True, True),
    "cross_entropy, float targets": lambda: ops.cpu_cross_entropy(f, i.float(), -100, 0.0, 0.0),
    "cross_entropy, V = 0": lambda: ops.cpu_cross_entropy(f[:, :0], i, -100, 0.0, 0.0),
    "cross_entropy, target out of range": lambda: ops.cpu_cross_entropy(f, i + 9, -100, 0.0, 0.0),
    "cross_entropy_grad, strided out": lambda: ops.cpu_cross_entropy_grad(f, i, torch.ones(3), -100, 0.0, 0.0,
                                                                          torch.empty(4, 3).T),
    "cross_entropy_grad, short weights": lambda: ops.cpu_cross_entropy_grad(f, i, torch.ones(2), -100, 0.0, 0.0,
                                                                            torch.empty(3, 4)),
    "linear, V = 0": lambda: ops.cpu_linear_cross_entropy(f, e, None, i, -100, 0.0, 0.0),
    "linear, targets of another length": lambda: ops.cpu_linear_cross_entropy(f, f, None, i[:2], -100, 0.0, 0.0),
    "linear, bias of another length": lambda: ops.cpu_linear_cross_entropy(f, f, torch.ones(2), i, -100, 0.0, 0.0),
    "linear fused, empty batch": lambda: ops.cpu_linear_cross_entropy_fused(e, f, None, i[:0], torch.ones(0), -100,
                                                                            0.0, 0.0),
    "linear fused, 1-D hidden": lambda: ops.cpu_linear_cross_entropy_fused(f[0], f, None, i, torch.ones(3), -100,
                                                                           0.0, 0.0),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "ok"
    except Exception as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.mark.skipif(_backends.EXT_ERROR is not None, reason="mmfast._C is not built")
def test_raw_cpu_ops_validate_their_inputs():
    """torch.ops.mmfast.cpu_* are reachable by users: bad arguments raise TypeError/ValueError, empty
    inputs give empty results, and nothing kills the process (an empty query set did, by SIGFPE)."""
    run = subprocess.run([sys.executable, "-c", RAW_CALLS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    empty_ok = {"topk, empty queries", "stats, empty queries", "linear fused, empty batch"}
    for name, result in results.items():
        assert result in (("ok",) if name in empty_ok else ("TypeError", "ValueError")), (name, result)


# ---------------------------------------------------------------- determinism

@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def contrastive_cases(backend):
    """Sizes that cross the cpu kernel's 256×256 tiles in both directions, so rows and columns are
    reduced over several tiles (the triton backend is interpreted here: small sizes)."""
    n, m, d = (300, 520, 16) if backend != "triton" else (40, 70, 8)
    a, b, neg = features(n, d, seed=1), features(m, d, seed=2), features(m // 2, d, seed=3)
    s, bias = torch.tensor(20.0), torch.tensor(-3.0)
    labels = torch.arange(n) % m
    return [
        (lambda a, b, s, bi: mmfast.clip_loss(a, b[:n], s, logit_bias=bi, label_smoothing=0.1, backend=backend),
         lambda a, b, s, bi: oracle.clip_loss(a, b[:n], s, bi, 0.1), [a, b, s, bias]),
        (lambda a, b, s, q: mmfast.infonce_loss(a, b, s, labels=labels, negatives=q, backend=backend),
         lambda a, b, s, q: oracle.infonce_loss(a, b, s, labels, q), [a, b, s, neg]),
        (lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend=backend), oracle.siglip_loss, [a, b, s, bias]),
    ]


def masked_lm_cases(backend):
    """Several 256-row blocks of kept rows and 512-column chunks on the cpu backend."""
    t, v, d = (700, 1300, 24) if backend != "triton" else (50, 90, 8)
    h, w, bias, y = torch.randn(t, d), torch.randn(v, d) * 0.3, torch.randn(v), targets(t, v)
    x = torch.randn(t, v) * 2
    return [
        (lambda h, w, b: mmfast.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, backend=backend),
         lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, eps=0.1), [h, w, bias]),
        (lambda h, w, b: mmfast.linear_cross_entropy(h, w, y, bias=b, reduction="none", backend=backend).sum(),
         lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, reduction="sum"), [h, w, bias]),
        (lambda x: mmfast.cross_entropy(x, y, z_loss=1e-3, backend=backend),
         lambda x: oracle.masked_lm_loss(x, y, z=1e-3), [x]),
    ]


@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
@pytest.mark.parametrize("family", ["contrastive", "masked_lm"])
def test_deterministic_mode_is_bit_for_bit_and_right(backend, family, deterministic):
    """Under torch.use_deterministic_algorithms(True) three runs give identical bits (the cpu
    kernels then reduce in a fixed order), and the values are the float64 reference's."""
    cases = contrastive_cases(backend) if family == "contrastive" else masked_lm_cases(backend)
    for ours, ref, tensors in cases:
        runs = [loss_and_grads(ours, tensors) for _ in range(3)]
        for run in runs[1:]:
            assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))
        for out, exp in zip(runs[0], loss_and_grads(ref, [t.double() for t in tensors])):
            assert rel_err(out, exp) < FP32_TOL
