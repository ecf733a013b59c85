"""Regression tests of the Triton backend's hardening, at the interpreter tier (CPU tensors under
TRITON_INTERPRET=1; on a machine with a GPU they run on CUDA instead, where they say more).

The interpreter runs a program as one thread, so a race between a program's warps or a wrong
GPU-compiler assumption cannot show here: those fixes are argued in the kernels' comments, and
these tests hold what it can show (values at tile, chunk and split edges, int64 offsets past 2^31
through a stub kernel, deterministic launches, memory formulas against real allocations).
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import tempfile
import types

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import mmfast  # noqa: E402
from mmfast import _backends, _triton  # noqa: E402
from mmfast.contrastive import triton_kernels as tk  # noqa: E402
from mmfast.cross_entropy import triton_kernels as ce  # noqa: E402
from tests import oracle  # noqa: E402
from tests.helpers import features, loss_and_grads, rel_err  # noqa: E402
from tests.test_gpu import clip_loss_memory, linear_cross_entropy_memory, peak  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(_backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=f"triton backend: {_backends.unavailable_reason('triton', DEVICE)}")


# ---------------------------------------------------------------- item 8: the target's gradient entry

@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_grad_writes_the_target_entry_in_its_chunk(inplace):
    """Targets at both edges of every chunk (32 wide in the interpreter), an ignored row, a peaked
    row; in place the kernel reads x_y before overwriting the row."""
    v, eps, z = 70, 0.1, 1e-3
    y = torch.tensor([0, 31, 32, 63, 64, 69, -1, 5])
    x = torch.randn(len(y), v, dtype=torch.float64) * 3
    x[7, 5] = 40.0  # softmax_y → 1: the target's entry is the small 1 − softmax_y
    w = torch.rand(len(y), dtype=torch.float64) + 0.5
    x32 = x.float().to(DEVICE)
    out = x32 if inplace else torch.empty_like(x32)
    ce.cross_entropy_grad(x32, y.to(DEVICE), w.float().to(DEVICE), eps, z, out)

    xr = x.float().double()  # the float64 gradient of the fp32 logits the kernel saw
    lse = torch.logsumexp(xr, 1, keepdim=True)
    kept = (y >= 0).double()[:, None]
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), v).double()
    expected = kept * w[:, None] * (torch.exp(xr - lse) * (1 + 2 * z * lse) - eps / v - (1 - eps) * onehot)
    assert rel_err(out.cpu(), expected, floor=1e-3) < 1e-5
    targets = (torch.arange(7), y[:7].clamp_min(0))
    assert torch.allclose(out.cpu()[targets].double(), expected[targets], rtol=1e-5, atol=1e-7)
    assert abs(out[7, 5].item() - expected[7, 5].item()) <= 1e-5 * abs(expected[7, 5].item())


# ---------------------------------------------------------------- item 9: fp32 matmul precision

@pytest.fixture
def matmul_precision():
    """Restores the legacy setting first (on torch ≥ 2.9 it also writes the new API's state), then
    the new API's own values."""
    legacy = torch.get_float32_matmul_precision()
    new = [(obj, obj.fp32_precision) for obj in (torch.backends, torch.backends.cuda.matmul)
           if hasattr(obj, "fp32_precision")]
    yield bool(new)
    torch.set_float32_matmul_precision(legacy)
    for obj, value in new:
        obj.fp32_precision = value
    assert torch.get_float32_matmul_precision() == legacy


@pytest.mark.parametrize("matmul,generic,expected", [
    ("tf32", "none", "tf32"), ("ieee", "none", "ieee"), ("none", "tf32", "tf32"), ("none", "ieee", "ieee"),
    ("ieee", "tf32", "ieee"), ("tf32", "ieee", "tf32"),  # the matmul setting wins over the generic one
])
def test_precision_reads_the_new_fp32_precision_api(matmul_precision, matmul, generic, expected):
    if not matmul_precision:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cuda.matmul.fp32_precision")
    torch.backends.fp32_precision = generic
    torch.backends.cuda.matmul.fp32_precision = matmul
    assert _triton.precision(torch.float32) == expected  # where get_float32_matmul_precision() may raise
    assert _triton.precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("legacy,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_precision_falls_back_to_the_legacy_setting(matmul_precision, monkeypatch, legacy, expected):
    torch.set_float32_matmul_precision(legacy)
    assert _triton.precision(torch.float32) == expected
    # torch < 2.9: no fp32_precision attributes at all
    old_backends = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=types.SimpleNamespace()))
    with monkeypatch.context() as patch:
        patch.setattr(_triton.torch, "backends", old_backends)
        answer = _triton.precision(torch.float32)
    assert answer == expected


# ---------------------------------------------------------------- item 10: int64 offsets

@triton.jit
def _offsets_stub(out_ptr, row0, col0, stride, NAIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores a tile's offsets as the similarity kernel forms them (or, NAIVE, as it did: r·M in int32)."""
    if NAIVE:
        offsets = _triton.wide(row0) * stride + col0 + (tl.arange(0, BLOCK_M)[:, None] * stride
                                                        + tl.arange(0, BLOCK_N)[None, :])
    else:
        offsets = _triton.tile_offsets(row0, col0, stride, BLOCK_M, BLOCK_N)
    i = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + i, offsets.to(tl.int64))


def test_tile_offsets_pass_2_to_the_31():
    """An (N, M) output with M = 2^27 + 3 > 2^31 / 32: a 32-row tile's r·M passes 2^31 at r = 16.
    The stub forms the same offsets as the similarity kernel's store, without the 2^36-byte output."""
    bm, bn, row0, col0, stride = 32, 16, 96, 48, 2**27 + 3
    expected = torch.tensor([[(row0 + r) * stride + col0 + c for c in range(bn)] for r in range(bm)])
    assert expected.max() > 2**31
    # In the interpreter the int32 form visibly wraps: the test can see the bug it guards against (a
    # GPU compiler may legally widen an int32 product whose overflow is undefined, so not there).
    for naive in (False, True) if DEVICE.type == "cpu" else (False,):
        out = torch.empty(bm * bn, dtype=torch.int64, device=DEVICE)
        _offsets_stub[(1,)](out, row0, col0, stride, NAIVE=naive, BLOCK_M=bm, BLOCK_N=bn)
        assert torch.equal(out.view(bm, bn).cpu(), expected) != naive


def test_sizes_past_int32_indexing_are_refused():
    with pytest.raises(ValueError, match="feature width"):
        _triton.check_sizes("similarity", _triton.WIDTH_LIMIT, N=4)
    with pytest.raises(ValueError, match="M = "):
        _triton.check_sizes("similarity", 64, N=4, M=_triton.COUNT_LIMIT)
    _triton.check_sizes("similarity", _triton.WIDTH_LIMIT - 1, N=_triton.COUNT_LIMIT - 1)


@triton.jit
def _downcast_stub(x_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _triton.downcast(tl.load(x_ptr + i), out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_downcast_rounds_to_nearest_even_as_torch(dtype):
    """The kernels' outputs and bf16 GEMM operands round as torch (and the GPU) do; the interpreter
    alone would truncate fp32 → bf16, doubling the error the bf16 tests measure."""
    x = torch.randn(1024) * torch.logspace(-6, 6, 1024)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-9 * 3], dtype=torch.float32)  # halfway cases
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38, 1e-30])
    x[:ties.numel()], x[-special.numel():] = ties, special
    out = torch.empty(1024, dtype=dtype, device=DEVICE)
    _downcast_stub[(1,)](x.to(DEVICE), out, BLOCK=1024)
    expected = x.to(dtype)
    assert torch.equal(out.cpu().isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(out.cpu()[ok].view(torch.int16), expected[ok].view(torch.int16))


# ---------------------------------------------------------------- item 12: the stats grid

def test_stats_grid_fills_the_gpu_with_bounded_partials(monkeypatch):
    """On an H200 (132 SMs: 528 programs) with the GPU's 128-row blocks and 128-wide splits, and
    invariants for every size: P ≤ programs, P·Q < 2·programs, the splits tile [0, M) in whole
    tiles, and Q = 1 or Q·N ≤ 2·programs·BLOCK_M (the row partials' int32 offsets)."""
    monkeypatch.setattr(tk, "max_programs", lambda device, interpreted: 528)
    monkeypatch.setattr(tk, "_STATS_BLOCK_M", 128)
    monkeypatch.setattr(tk, "_SPLIT_ALIGN", 128)
    assert tk.stats_grid(4096, 65536, DEVICE) == (32, 17, 3968)  # was 32 programs in all
    assert tk.stats_grid(131072, 131072, DEVICE) == (528, 1, 131072)
    for n in (1, 100, 4096, 30000, 67584, 10**6):
        for m in (1, 127, 129, 4096, 65536, 10**6):
            rows, splits, width = tk.stats_grid(n, m, DEVICE)
            assert rows == min(528, -(-n // 128)) and rows * splits < 2 * 528
            assert width % 128 == 0 and (splits - 1) * width < m <= splits * width
            assert splits == 1 or splits * n <= 2 * 528 * 128
            if m >= 528 * 128:  # whole-tile splits round the count down by at most half
                assert 2 * rows * splits >= 528


@pytest.mark.parametrize("n,m", [(1, 200), (7, 33), (33, 100), (40, 70), (70, 129), (161, 50)])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_stats_across_split_edges_match_float64(n, m, sigmoid):
    a, b = features(n, 40), features(m, 40)
    scale, bias = torch.tensor(25.0), torch.tensor(-2.0)
    positives = torch.randint(-1, m, (n,))
    row, col = tk.triton_contrastive_stats(a.to(DEVICE), b.to(DEVICE), scale.to(DEVICE), bias.to(DEVICE),
                                           positives.to(DEVICE), sigmoid, True)
    z = scale.double() * a.double() @ b.double().T + bias.double()
    if sigmoid:
        t = torch.where(torch.arange(m)[None, :] == positives[:, None], 1.0, -1.0).double()
        exp_row = torch.nn.functional.softplus(-t * z).sum(1)
        assert col.numel() == 0
    else:
        exp_row = torch.logsumexp(z, 1)
        assert torch.allclose(col.cpu(), torch.logsumexp(z, 0), rtol=0, atol=2e-5)
    assert torch.allclose(row.cpu(), exp_row, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_an_empty_key_bank_gives_the_statistics_of_no_terms(sigmoid):
    """M = 0 (an empty negative bank): logsumexp −inf (softmax) or a sum of 0 (sigmoid) per row,
    and zero gradients; N = 0: empty rows and −inf per column."""
    a, empty = features(40, 16).to(DEVICE), torch.empty(0, 16, device=DEVICE)
    scale = torch.tensor(10.0, device=DEVICE)
    row, col = tk.triton_contrastive_stats(a, empty, scale, None, None, sigmoid, True)
    assert torch.equal(row.cpu(), torch.full((40,), 0.0 if sigmoid else float("-inf"), dtype=torch.float64))
    assert col.numel() == 0
    ones = torch.ones(40, dtype=torch.float64, device=DEVICE)
    da, db, ds, dbias = tk.triton_contrastive_grad(a, empty, scale, None, None, row, col, ones, col, sigmoid,
                                                   True, True)
    assert not da.any() and db.shape == (0, 16) and ds == 0 and dbias == 0
    if not sigmoid:
        row, col = tk.triton_contrastive_stats(empty, a, scale, None, None, False, True)
        assert row.numel() == 0 and torch.equal(col.cpu(), torch.full((40,), float("-inf"), dtype=torch.float64))


def test_some_stats_shapes_above_split_the_columns():
    grids = [tk.stats_grid(n, m, DEVICE) for n, m in [(7, 33), (40, 70), (1, 200)]]
    assert DEVICE.type == "cuda" or all(splits > 1 for _, splits, _ in grids)


def test_merge_lse_matches_float64():
    parts, length = 5, 70
    mx = torch.randn(parts, length) * 20
    sums = torch.rand(parts, length, dtype=torch.float64) * 10 + 1
    mx[:, 3] = float("-inf")  # a column no part saw: −inf
    sums[:, 3] = 0.0
    mx[2, 9] = float("-inf")  # one part empty
    sums[2, 9] = 0.0
    sums[1, 20] = float("nan")  # NaN propagates
    out = _triton.merge_lse(mx.to(DEVICE), sums.to(DEVICE)).cpu()
    expected = torch.logsumexp(mx.double() + sums.log(), 0)
    assert out.dtype == torch.float64
    assert torch.equal(out.isnan(), expected.isnan()) and out[3] == float("-inf")
    ok = expected.isfinite()
    assert torch.allclose(out[ok], expected[ok], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- determinism

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every contrastive kernel launch."""
    seen, real = [], tk.wrap_triton

    def spy(kernel):
        wrapped = real(kernel)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append(kwargs)
                    return wrapped[grid](*args, **kwargs)
                return launch
        return Launcher()

    monkeypatch.setattr(tk, "wrap_triton", spy)
    return seen


LOSSES = {
    "clip": lambda a, b, s: mmfast.clip_loss(a, b, s, label_smoothing=0.1, backend="triton"),
    "infonce": lambda a, b, s: mmfast.infonce_loss(a, b, s, labels=torch.arange(a.shape[0], device=a.device).flip(0),
                                                   backend="triton"),
    "siglip": lambda a, b, s: mmfast.siglip_loss(a, b, s, -3.0, backend="triton"),
}
ORACLES = {
    "clip": lambda a, b, s: oracle.clip_loss(a, b, s, eps=0.1),
    "infonce": lambda a, b, s: oracle.infonce_loss(a, b, s, torch.arange(a.shape[0]).flip(0)),
    "siglip": lambda a, b, s: oracle.siglip_loss(a, b, s, -3.0),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_contrastive_grad_is_repeatable_under_deterministic_mode(deterministic, launches, loss):
    """dB from the column sweep (no atomics; ds, db from per-program partials): two runs agree bit
    for bit, and with the float64 oracle; no launch adds into dB with atomics."""
    n, m, d = 45, 70, 40
    tensors = [features(n, d).to(DEVICE), features(m, d).to(DEVICE), torch.tensor(12.0, device=DEVICE)]
    if loss == "clip":
        tensors[1] = features(n, d).to(DEVICE)
    first = loss_and_grads(LOSSES[loss], tensors)
    second = loss_and_grads(LOSSES[loss], tensors)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    expected = loss_and_grads(ORACLES[loss], [t.double().cpu() for t in tensors])
    for x, y in zip(first, expected):
        assert rel_err(x.cpu(), y, floor=1.0) < 1e-5
    grads = [kw for kw in launches if "COLUMNS" in kw]
    assert any(kw["COLUMNS"] for kw in grads)
    assert not any(kw["NEED_B"] and not kw["COLUMNS"] for kw in grads)


def test_contrastive_grad_without_determinism_uses_one_sweep(launches):
    tensors = [features(40, 24).to(DEVICE), features(40, 24).to(DEVICE), torch.tensor(10.0, device=DEVICE)]
    loss_and_grads(LOSSES["clip"], tensors)
    grads = [kw for kw in launches if "COLUMNS" in kw]
    assert len(grads) == 1 and grads[0]["NEED_B"] and not grads[0]["COLUMNS"]


def _linear_ce(h, w):
    y = torch.arange(h.shape[0], device=h.device) % w.shape[0]
    y[::3] = -100
    return mmfast.linear_cross_entropy(h, w, y, backend="triton")


def test_linear_cross_entropy_backward_refuses_determinism(deterministic):
    h, w = torch.randn(20, 16, device=DEVICE), torch.randn(50, 16, device=DEVICE)
    loss = _linear_ce(h, w)  # the forward is deterministic
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy.*backend='torch'"):
        loss_and_grads(_linear_ce, [h, w])
    assert torch.equal(loss, _linear_ce(h, w))


def test_linear_cross_entropy_backward_warns_when_warn_only():
    h, w = torch.randn(20, 16, device=DEVICE), torch.randn(50, 16, device=DEVICE)
    expected = loss_and_grads(_linear_ce, [h, w])
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="linear_cross_entropy"):
            got = loss_and_grads(_linear_ce, [h, w])
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for x, y in zip(got, expected):
        assert rel_err(x, y) < 1e-6


def test_atomic_free_kernels_repeat_bit_for_bit(deterministic):
    """stats, cross_entropy (forward and gradient), similarity and top-k have no atomics: under
    deterministic mode they run, and repeat."""
    a, b = features(50, 24).to(DEVICE), features(90, 24).to(DEVICE)
    x, y = torch.randn(6, 70, device=DEVICE), torch.tensor([1, 2, -100, 4, 69, 0], device=DEVICE)
    calls = [
        lambda: [mmfast.clip_loss(a, b[:50], 10.0, backend="triton")],
        lambda: loss_and_grads(lambda x: mmfast.cross_entropy(x, y, backend="triton"), [x]),
        lambda: [mmfast.similarity(a, b, backend="triton")],
        lambda: list(mmfast.topk_similarity(a, b, 5, backend="triton")),
    ]
    for call in calls:
        for first, second in zip(call(), call()):
            assert torch.equal(first, second)


# ---------------------------------------------------------------- item 11: memory formulas

def _cpu_peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes during fn() beyond those before it (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - base


@pytest.fixture
def prompt_interpreter_frees(monkeypatch):
    """The interpreter holds every launch's arguments in a reference cycle (its recursive _to_cpu
    closure) until the garbage collector runs; a GPU launch holds nothing. Collect after each
    launch, so that CPU allocations follow the GPU's."""
    from triton.runtime.interpreter import GridExecutor

    call = GridExecutor.__call__

    def call_and_collect(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect()

    monkeypatch.setattr(GridExecutor, "__call__", call_and_collect)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the gpu tier measures these on the device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_loss_memory_formula_matches_allocations(prompt_interpreter_frees, dtype):
    n, d = 192, 96
    a, b = features(n, d, dtype).requires_grad_(), features(n, d, dtype).requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)

    def step():
        mmfast.clip_loss(a, b, s, backend="triton").backward()

    step()
    a.grad = b.grad = s.grad = None
    measured = _cpu_peak_bytes(step)
    rows, splits, _ = tk.stats_grid(n, n, a.device)
    bound = peak(clip_loss_memory(n, d, a.element_size(), rows, splits))
    assert 0.85 * bound <= measured <= bound, (measured, bound)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the gpu tier measures these on the device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_memory_formula_matches_allocations(prompt_interpreter_frees, dtype):
    t, v, d = 384, 300, 64
    h = torch.randn(t, d).to(dtype).requires_grad_()
    w = (torch.randn(v, d) * d ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (t,))
    y[torch.rand(t) >= 0.15] = -100

    def step():
        mmfast.linear_cross_entropy(h, w, y, backend="triton").backward()

    step()
    h.grad = w.grad = None
    measured = _cpu_peak_bytes(step)
    bound = peak(linear_cross_entropy_memory(t, v, d, h.element_size(), -(-v // ce._LCE_SPLIT_V)))
    assert 0.85 * bound <= measured <= bound, (measured, bound)


# ---------------------------------------------------------------- item 13: the GPU check's plan

def test_gpu_check_dry_run_plans_at_most_480_seconds():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^step\s+(\S+)\s+timeout\s+(\d+) s", out.stdout, re.M)
    total = re.search(r"^total\s+(\d+) s", out.stdout, re.M)
    assert steps and total, out.stdout
    assert int(total.group(1)) == sum(int(t) for _, t in steps) <= 480
    names = {name for name, _ in steps}
    for family in ("clip", "siglip", "infonce", "cross_entropy", "linear_cross_entropy", "similarity", "topk"):
        assert f"bench-{family}" in names, names


@pytest.mark.skipif(DEVICE.type != "cpu", reason="gpu_check.sh's bench steps run these on the device")
def test_gpu_benchmarks_run_end_to_end_at_tiny_sizes(monkeypatch, tmp_path):
    """Every family of benchmarks/bench_gpu.py, at tiny sizes on CPU (the triton backend in the
    interpreter, a stand-in for the CUDA timing), writes a row per implementation, and the report
    reads them: the prepared script's Python is exercised before a GPU runs it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_gpu
    import bench_gpu_cross_entropy as mlm
    import harness

    for name, value in {"DEVICE": DEVICE.type, "CLIP_SIZES": [(40, 24)], "SIGLIP_SIZES": [(40, 24)],
                        "INFONCE_SIZES": [(8, 70, 24)], "SIMILARITY_SIZES": [(40, 50, 24)],
                        "TOPK_SIZES": [(40, 300, 24, 5)], "TOPK_CHUNK": 128, "AGREEMENT_QUERIES": 16}.items():
        monkeypatch.setattr(bench_gpu, name, value)
    monkeypatch.setattr(mlm, "CROSS_ENTROPY_SIZES", [(6, 70)])
    monkeypatch.setattr(mlm, "SHAPES", {"bert": (64, 50, 16), "xlmr": (32, 70, 16)})

    def measure(step, leaves, repeats):
        step()
        return {"times_s": [1e-3], "median_s": 1e-3, "extra_peak_bytes": 0}
    monkeypatch.setattr(harness, "gpu_measure", measure)
    log = harness.RowLog(tmp_path / "rows.jsonl")
    for family in bench_gpu.families():
        assert bench_gpu.run_family(family, harness.Budget(3600), log) == 0, log.rows()[-3:]
    rows = [r for r in log.rows() if "impl" in r]
    for family in bench_gpu.families():
        impls = {r["impl"] for r in rows if r["family"] == family and "median_s" in r}
        assert {"mmfast-triton", "mmfast-torch", "mmfast-reference"} <= impls, (family, impls)
    assert not any("error" in r for r in rows if r["impl"].startswith("mmfast-")), rows
    assert any(r.get("kind") == "agreement" for r in log.rows())
    report = json.loads(bench_gpu.report(log).read_text())
    assert len(report["rows"]) == len(rows)
