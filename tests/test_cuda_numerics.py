"""kernels/numerics.cuh, the numerics the CUDA kernels share with the other backends, checked on CPU:
the header is compiled as host C++ (tests/cuda_numerics_harness.cpp) and each function is compared
with float64 (torch, math) on fresh random inputs, peaked rows, ±inf, NaN and signed zeros."""
from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfast.similarity import order

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++, g++ or clang++) on PATH")

F32, F64, I32, I64 = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_double, ctypes.c_int32, ctypes.c_int64))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("numerics") / "libnumerics.so"
    proc = subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{ROOT / 'kernels'}",
                           str(ROOT / "tests" / "cuda_numerics_harness.cpp"), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(out))


def ptr(a: np.ndarray):
    kind = {np.float32: F32, np.float64: F64, np.int32: I32, np.int64: I64}[a.dtype.type]
    return a.ctypes.data_as(kind)


def row_lse(lib, x: np.ndarray, parts: int, naive: bool = False) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape[0])
    lib.row_lse(ptr(x), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), ctypes.c_int64(parts),
                ctypes.c_int(int(naive)), ptr(out))
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("parts", [1, 3, 64])
def test_online_logsumexp_merge_matches_float64(lib, parts):
    x = (torch.randn(9, 1001, dtype=torch.float64) * 30).float()  # 1001: chunks of ragged width
    x[2, ::7] = float("-inf")  # masked entries
    got = row_lse(lib, x.numpy(), parts)
    assert rel(got, torch.logsumexp(x.double(), 1).numpy()) < 1e-6


def test_logsumexp_of_masked_rows_and_nan(lib):
    x = torch.randn(3, 50)
    x[0] = float("-inf")  # an all-masked row: −inf, as torch.logsumexp
    x[1, 17] = float("nan")  # NaN propagates
    got = row_lse(lib, x.numpy(), 4)
    assert got[0] == -math.inf and math.isnan(got[1]) and math.isfinite(got[2])


def test_peaked_row_keeps_its_small_terms(lib):
    """A peaked row: the top logit 25 above 30000 others, so lse − max = log(1 + 30000·e^−25) ≈ 4e-7
    is the row's whole loss. The row is summed as a kernel's threads do, in chunks of ~120 terms in
    fp32 merged in fp64. Counting the top entry apart (exp_top) keeps the loss to fp32 accuracy;
    summed in fp32 with the rest of its chunk (naive), that chunk's small terms are lost, which this
    test also shows (so it can fail)."""
    v = 30000
    x = torch.full((2, v), -25.0) + torch.rand(2, v) * 1e-3
    x[:, 5] = 0.0
    exact = (torch.logsumexp(x.double(), 1) - x.double().max(1).values).numpy()
    careful = row_lse(lib, x.numpy(), 256) - x.max(1).values.double().numpy()
    naive = row_lse(lib, x.numpy(), 256, naive=True) - x.max(1).values.double().numpy()
    assert rel(careful, exact) < 1e-5
    assert rel(naive, exact) > 1e-3


def test_split_statistic_keeps_fp64_accuracy(lib):
    """exp(x − stat) with stat fp64 near 100: subtracting fp32(stat) alone is off by up to 4e-6
    (half an ulp of 100), which exp turns into a relative error; hi + lo keeps 1e-7."""
    n = 4096
    stat = 100.0 + torch.rand(n, dtype=torch.float64)
    x = (stat + torch.randn(n, dtype=torch.float64) * 3).float()
    exact = torch.exp(x.double() - stat).numpy()
    got, rough = np.empty(n, np.float32), np.empty(n, np.float32)
    lib.exp_minus_stat(ptr(x.numpy()), ptr(stat.numpy()), ctypes.c_int64(n), 1, ptr(got))
    lib.exp_minus_stat(ptr(x.numpy()), ptr(stat.numpy()), ctypes.c_int64(n), 0, ptr(rough))
    err, rough_err = np.abs(got / exact - 1).max(), np.abs(rough / exact - 1).max()
    assert err < 1e-6 < rough_err


def test_softmax_grad_matches_float64(lib):
    n = 2000
    """Logits within 10 of their row's / column's logsumexp (where the gradient is not negligible),
    the statistics fp64 near 60."""
    z = (torch.randn(n) * 20 + 60).numpy()
    r = z + (torch.rand(n, dtype=torch.float64) * 10).numpy()
    c = z + (torch.rand(n, dtype=torch.float64) * 10).numpy()
    wr, wc = torch.rand(n).numpy(), torch.rand(n).numpy()
    wc[::3] = 0  # no column statistic
    got = np.empty(n, np.float32)
    lib.softmax_grads(ptr(z), ptr(r), ptr(wr), ptr(c), ptr(wc), ctypes.c_int64(n), ptr(got))
    zd = z.astype(np.float64)
    exact = wr * np.exp(zd - r) + wc * np.exp(zd - c)
    assert np.all(np.abs(got - exact) <= 2e-6 * np.abs(exact))


def test_target_grad_of_peaked_rows(lib):
    """g_y = w·(1 + 2z·lse)·(softmax_y − 1) + w·(2z·lse + ε(1 − 1/V)) against math.expm1 in float64,
    for rows from balanced to peaked (x_y − lse down to −1e-9)."""
    n, v, eps, zl = 64, 50000, 0.1, 1e-4
    gap = -np.logspace(-9, 1, n)
    lse = np.random.default_rng().normal(0, 5, n)
    x_y, w = lse + gap, np.random.default_rng().uniform(0.1, 2, n)
    got = np.empty(n, np.float32)
    lib.target_grads(ptr(x_y), ptr(lse), ptr(w), ctypes.c_float(eps), ctypes.c_float(zl), ctypes.c_int64(v),
                     ctypes.c_int64(n), ptr(got))
    exact = np.array([wi * (1 + 2 * zl * li) * math.expm1(g) + wi * (2 * zl * li + eps * (1 - 1 / v))
                      for wi, li, g in zip(w, lse, gap)])
    assert np.all(np.abs(got - exact) <= 2e-7 * np.abs(exact) + 1e-30)


@pytest.mark.parametrize("kind", ["softplus", "sigmoid", "sigmoid_grad"])
def test_sigmoid_forms_match_float64(lib, kind):
    z = torch.cat([torch.randn(3000) * 40, torch.tensor([0.0, -0.0, 88.0, -88.0, -200.0, 200.0, 1e-30])])
    t = torch.where(torch.rand(z.shape) < 0.5, -1.0, 1.0)
    got = np.empty(z.numel(), np.float32)
    lib.sigmoid_forms(ptr(z.numpy()), ptr(t.numpy()), ctypes.c_int64(z.numel()),
                      ["softplus", "sigmoid", "sigmoid_grad"].index(kind), ptr(got))
    zd, td = z.double(), t.double()
    exact = {"softplus": torch.nn.functional.softplus(zd, threshold=1000), "sigmoid": torch.sigmoid(zd),
             "sigmoid_grad": -td * torch.sigmoid(-td * zd)}[kind].numpy()
    # fp32 results: 4 ulps relative, and the smallest normal float absolute (σ(−200) underflows)
    assert np.all(np.abs(got - exact) <= 5e-7 * np.abs(exact) + 1.2e-38)


def test_sigmoid_forms_of_inf_and_nan(lib):
    z = np.array([np.inf, -np.inf, np.nan], np.float32)
    out = {}
    for kind in range(3):
        got = np.empty(3, np.float32)
        lib.sigmoid_forms(ptr(z), ptr(np.ones(3, np.float32)), ctypes.c_int64(3), kind, ptr(got))
        out[kind] = got
    assert out[0][0] == np.inf and out[0][1] == 0 and np.isnan(out[0][2])  # softplus
    assert out[1][0] == 1 and out[1][1] == 0 and np.isnan(out[1][2])  # σ
    assert out[2][0] == 0 and out[2][1] == -1 and np.isnan(out[2][2])  # −σ(−z)


def special_floats(n: int) -> torch.Tensor:
    x = torch.randn(n) * torch.exp(torch.randn(n) * 20)
    extra = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.4e38, -3.4e38])
    return torch.cat([x, extra, -x[:50]]).float()


def test_ordered_keys_are_order_py_keys(lib):
    x = special_floats(5000)
    keys, back = np.empty(x.numel(), np.int32), np.empty(x.numel(), np.float32)
    lib.ordered_keys(ptr(x.numpy()), ctypes.c_int64(x.numel()), ptr(keys), ptr(back))
    assert np.array_equal(keys, order.ordered_int32(x).numpy())
    expected = torch.where(x == 0, 0.0, x).numpy()  # −0.0 comes back as +0.0; NaN as a NaN
    assert np.array_equal(back, expected, equal_nan=True)


def test_ranks_before_is_top_ks_order(lib):
    """ranks_before against order.py's int64 rank keys (larger first, NaN on top, then the lower column)."""
    n = 20000
    pool = special_floats(200)
    xa, xb = pool[torch.randint(len(pool), (n,))], pool[torch.randint(len(pool), (n,))]
    ca, cb = torch.randint(0, 5, (n,)), torch.randint(0, 5, (n,))
    got = np.empty(n, np.int32)
    lib.ranks(ptr(xa.numpy()), ptr(ca.numpy()), ptr(xb.numpy()), ptr(cb.numpy()), ctypes.c_int64(n), ptr(got))
    expected = order.rank_keys(xa, ca) > order.rank_keys(xb, cb)
    assert np.array_equal(got.astype(bool), expected.numpy())
    assert got.any() and not got.all()
