"""similarity and topk_similarity on every backend against float64 references and a brute-force
ordering (larger first, NaN above every number, ties to the lower column)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.similarity import op
from tests.helpers import (FP32_TOL, FUSED, backend_params, features, loss_and_grads,
                           peak_growth_in_subprocess, rel_err, skip_if_interpreted_and_large)

ALL = backend_params()


def scores64(a, b, scale, normalize):
    """The float64 oracle of S = scale·n(a)·n(b)ᵀ (F.normalize's eps)."""
    a, b = a.double(), b.double()
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return torch.as_tensor(scale).double() * (a @ b.T)


def brute_topk(s: torch.Tensor, k: int):
    """Each row sorted by the rule, written out: NaN first (by column), then value descending, then column."""
    s = s.double().numpy()
    cols = np.arange(s.shape[1])
    idx = np.stack([np.lexsort((cols, -np.nan_to_num(row, nan=0.0), ~np.isnan(row)))[:k] for row in s])
    return torch.from_numpy(np.take_along_axis(s, idx, 1)), torch.from_numpy(idx)


def check_topk(values, indices, s64, k, tol=FP32_TOL):
    """Values within tol of the float64 top-k values; every index holds its value (within tol, so
    near-ties may resolve either way); indices distinct; values sorted descending."""
    assert values.shape == (s64.shape[0], k) and indices.shape == (s64.shape[0], k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    floor = 0.1 * max(1.0, float(s64.abs().max()))
    assert rel_err(values, s64.topk(k, dim=1).values, floor) <= tol
    assert rel_err(s64.gather(1, indices), values, floor) <= tol
    assert all(len(set(row.tolist())) == k for row in indices)
    assert bool((values[:, :-1] >= values[:, 1:]).all())


# (5, 3000, 16): few rows, many columns: the cpu kernel splits the columns into segments and merges.
# (1100, 4000, 8): past the torch backend's chunks of 2^22 scores (forward, top-k and backward).
SHAPES = [(1, 1, 1), (7, 129, 13), (129, 7, 33), (40, 150, 37), (300, 1000, 100), (5, 3000, 16), (1100, 4000, 8)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_topk_fp32(backend, n, m, d, normalize):
    skip_if_interpreted_and_large(backend, n, m, d)
    a, b = features(n, d, normalize=False), features(m, d, normalize=False)
    s64 = scores64(a, b, 3.7, normalize)
    for k in sorted({1, min(5, m), m}):
        values, indices = mmfast.topk_similarity(a, b, k, scale=3.7, normalize=normalize, backend=backend)
        check_topk(values, indices, s64, k)


def exact_features(n, d, normalize, seed):
    """Features whose scores are exact in fp32 (and bf16), with many ties: small integers, or for
    normalize rows of ±1 on 4 of d coordinates (norm 2, so n(x) = x/2 exactly)."""
    g = torch.Generator().manual_seed(seed)
    if not normalize:
        return torch.randint(-2, 3, (n, d), generator=g).float()
    x = torch.zeros(n, d)
    for i in range(n):
        cols = torch.randperm(d, generator=g)[:4]
        x[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_ties_are_exact(backend, normalize, dtype):
    """Duplicated keys and small-integer scores: every backend gives exactly the brute-force order."""
    a = exact_features(33, 8, normalize, 1)
    b = exact_features(150, 8, normalize, 2)
    b[100:140] = b[:40]  # duplicated keys
    b[[7, 77]] = b[140].clone()
    s64 = scores64(a, b, 2.0, normalize)
    for k in (1, 7, 150):
        values, indices = mmfast.topk_similarity(a.to(dtype), b.to(dtype), k, scale=2.0, normalize=normalize,
                                                 backend=backend)
        ref_values, ref_indices = brute_topk(s64, k)
        assert torch.equal(indices, ref_indices), k
        assert torch.equal(values.double(), ref_values), k


@pytest.mark.parametrize("backend", ALL)
def test_topk_ties_across_column_segments(backend):
    """Few queries, many keys (the cpu kernel splits the columns and merges), the duplicates of a
    key far apart (in different segments, tiles and chunks): still ties to the lower index."""
    a, b = exact_features(3, 8, False, 11), exact_features(2100, 8, False, 12)
    b[1500:] = b[:600].clone()
    for k in (1, 10, 2100):
        values, indices = mmfast.topk_similarity(a, b, k, backend=backend)
        ref_values, ref_indices = brute_topk(scores64(a, b, 1.0, False), k)
        assert torch.equal(indices, ref_indices) and torch.equal(values.double(), ref_values)


@pytest.mark.parametrize("backend", ALL)
def test_topk_nan_ranks_first(backend):
    """NaN ranks above every number (torch.topk's choice), NaNs among themselves by column."""
    a, b = exact_features(9, 4, False, 3), exact_features(40, 4, False, 4)
    a[2, 1] = float("nan")  # a NaN query: its whole row is NaN
    b[[5, 17], 0] = float("nan")  # NaN keys: NaN columns in every row
    s64 = scores64(a, b, 1.0, False)
    for k in (1, 3, 40):
        values, indices = mmfast.topk_similarity(a, b, k, backend=backend)
        ref_values, ref_indices = brute_topk(s64, k)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("scale", [-2.0, 0.0])
def test_topk_negative_and_zero_scale(backend, scale):
    """A negative scale reverses the order; scale 0 makes every score 0: the first k columns."""
    a, b = exact_features(6, 5, False, 5), exact_features(31, 5, False, 6)
    values, indices = mmfast.topk_similarity(a, b, 4, scale=scale, backend=backend)
    ref_values, ref_indices = brute_topk(scores64(a, b, scale, False), 4)
    assert torch.equal(indices, ref_indices) and torch.equal(values.double(), ref_values)


@pytest.mark.parametrize("backend", ALL)
def test_topk_bf16(backend):
    """bf16 inputs: within twice the error of torch's eager bf16 scores (ours are fp32 from bf16)."""
    a, b = features(33, 40, torch.bfloat16), features(150, 40, torch.bfloat16)
    s64 = scores64(a, b, 20.0, False)
    eager = 20.0 * (a @ b.T)
    tol = 2 * rel_err(eager, s64) + 1e-6
    values, indices = mmfast.topk_similarity(a, b, 10, scale=20.0, backend=backend)
    check_topk(values, indices, s64, 10, tol)


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs(backend):
    a, b = features(80, 70)[::2, :45], features(45, 90)[:, ::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    values, indices = mmfast.topk_similarity(a, b, 6, scale=5.0, normalize=True, backend=backend)
    check_topk(values, indices, scores64(a, b, 5.0, True), 6)
    s = mmfast.similarity(a, b, scale=5.0, normalize=True, backend=backend)
    assert rel_err(s, scores64(a, b, 5.0, True)) <= FP32_TOL


# ---------------------------------------------------------------- similarity

SIM_SHAPES = [(1, 1, 1), (7, 129, 13), (129, 7, 33), (40, 150, 37)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,m,d", SIM_SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_similarity_fp32_and_grads(backend, n, m, d, normalize):
    skip_if_interpreted_and_large(backend, n, m, d)
    a, b, scale = features(n, d, normalize=False), features(m, d, normalize=False), torch.tensor(3.7)
    w = torch.randn(n, m, dtype=torch.float64)  # the loss Σ w∘S makes G = w

    s = mmfast.similarity(a, b, scale=scale, normalize=normalize, backend=backend)
    assert s.dtype == torch.float32 and s.shape == (n, m)
    assert rel_err(s, scores64(a, b, scale, normalize)) <= FP32_TOL

    out = loss_and_grads(lambda a, b, sc: (mmfast.similarity(a, b, scale=sc, normalize=normalize, backend=backend)
                                           * w.float()).sum(), [a, b, scale])
    exp = loss_and_grads(lambda a, b, sc: (scores64(a, b, sc, normalize) * w).sum(), [t.double() for t in (a, b, scale)])
    # the reference backend is torch's own fp32 autograd: its scale gradient is an fp32 sum of N·M terms
    tol = 1e-4 if backend == "reference" else FP32_TOL
    # Under normalize a gradient is d − x̂(x̂·d) over ‖x‖, a difference of terms of size ‖d‖/‖x‖
    # (exactly 0 for D = 1): errors count against that size.
    a64, b64, w_a = a.double(), b.double(), 3.7 * w
    floors = [1.0, (w_a @ F.normalize(b64, dim=1)).norm().item() / a64.norm(dim=1).min().item(),
              (w_a.T @ F.normalize(a64, dim=1)).norm().item() / b64.norm(dim=1).min().item(), 1.0]
    for o, e, floor, name in zip(out, exp, floors, ["loss", "d_a", "d_b", "d_scale"]):
        assert rel_err(o, e, floor=max(1.0, 0.1 * floor if normalize else 1.0)) <= tol, name


@pytest.mark.parametrize("backend", ALL)
def test_similarity_bf16(backend):
    a, b = features(33, 40, torch.bfloat16), features(70, 40, torch.bfloat16)
    s64 = scores64(a, b, 10.0, True)
    tol = 2 * rel_err((10.0 * (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)), s64) + 1e-6
    s = mmfast.similarity(a, b, scale=10.0, normalize=True, backend=backend)
    assert s.dtype == torch.bfloat16 and rel_err(s, s64) <= tol
    s32 = mmfast.similarity(a, b, scale=10.0, normalize=True, out_dtype=torch.float32, backend=backend)
    assert s32.dtype == torch.float32 and rel_err(s32, s64) <= FP32_TOL
    # gradients: bf16 like the inputs, within twice the error of torch's eager bf16 gradients
    def eager(a, b):
        return (10.0 * (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)).float().sum()

    out = loss_and_grads(lambda a, b: mmfast.similarity(a, b, scale=10.0, normalize=True, backend=backend).float().sum(),
                         [a, b])
    exp = loss_and_grads(lambda a, b: scores64(a, b, 10.0, True).sum(), [a.double(), b.double()])
    for o, e, lo in zip(out[1:], exp[1:], loss_and_grads(eager, [a, b])[1:]):
        assert o.dtype == torch.bfloat16
        assert rel_err(o, e) <= 2 * rel_err(lo, e) + 1e-6


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_similarity_half_output_crosses_row_blocks(backend, out_dtype):
    """A bf16/fp16 output is written through blocks of 256 rows on the cpu backend: 600 rows cross
    two block edges; every row must be written (and right)."""
    a, b = features(600, 8), features(40, 8)
    s64 = scores64(a, b, 3.0, False)
    s = mmfast.similarity(a, b, scale=3.0, out_dtype=out_dtype, backend=backend)
    assert s.dtype == out_dtype
    assert rel_err(s, s64) <= 2 * rel_err(s64.to(out_dtype), s64) + 1e-6
    assert rel_err(s[512:], s64[512:]) <= 2 * rel_err(s64[512:].to(out_dtype), s64[512:]) + 1e-6


@pytest.mark.parametrize("backend", ALL)
def test_similarity_zero_row_and_negative_scale(backend):
    """A zero row under normalize gives zero scores (F.normalize's eps), not NaN; its gradient is
    F.normalize's (1/eps times the incoming one); a negative scale is allowed."""
    a, b = features(5, 6, normalize=False), features(8, 6, normalize=False)
    a[1] = 0.0
    w = torch.randn(5, 8, dtype=torch.float64)
    out = loss_and_grads(lambda a, b: (mmfast.similarity(a, b, scale=-2.0, normalize=True, backend=backend)
                                       * w.float()).sum(), [a, b])
    exp = loss_and_grads(lambda a, b: (scores64(a, b, -2.0, True) * w).sum(), [a.double(), b.double()])
    assert all(bool(torch.isfinite(o).all()) for o in out)
    for o, e in zip(out, exp):
        assert rel_err(o, e, floor=1.0) <= FP32_TOL


# ---------------------------------------------------------------- registration: opcheck, compile

@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck(backend, normalize):
    a, b = features(19, 12, normalize=False).requires_grad_(), features(23, 12, normalize=False).requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(op.similarity, (a, b, scale, normalize, torch.float32, backend))
    torch.library.opcheck(op.topk_similarity, (a.detach(), b.detach(), 5, scale.detach(), normalize, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(a, b, s):
        values, _ = mmfast.topk_similarity(a, b, 3, scale=s, normalize=True, backend=backend)
        return (mmfast.similarity(a, b, scale=s, normalize=True, backend=backend) ** 2).sum() + values.sum()

    tensors = [features(33, 16, normalize=False), features(40, 16, normalize=False), torch.tensor(7.0)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, exp = loss_and_grads(compiled, tensors), loss_and_grads(step, tensors)
    for o, e in zip(out, exp):
        assert rel_err(o, e) <= 1e-6


@pytest.mark.skipif("cpu" not in FUSED, reason="mmfast._C is not built")
def test_torch_compile_inductor_with_transposed_inputs():
    """Inductor checks the real outputs' strides against the fakes': transposed inputs catch a mismatch."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: mmfast.similarity(a.t(), b.t(), scale=2.0, normalize=True, backend="cpu"),
                       fullgraph=True)
    tensors = [features(8, 17).contiguous(), features(8, 11).contiguous()]
    out = loss_and_grads(lambda a, b: fn(a, b).sum(), tensors)
    exp = loss_and_grads(lambda a, b: scores64(a.t(), b.t(), 2.0, True).sum(), [t.double() for t in tensors])
    for o, e in zip(out, exp):
        assert rel_err(o, e, floor=1.0) <= FP32_TOL


# ---------------------------------------------------------------- bad input

A, B = features(4, 3), features(6, 3)

BAD = [
    (lambda: mmfast.topk_similarity(A, B, 7), ValueError, r"k must be in \[1, M\] = \[1, 6\]"),
    (lambda: mmfast.topk_similarity(A, B, 0), ValueError, "k must be in"),
    (lambda: mmfast.topk_similarity(A, B, 2.0), TypeError, "k must be an int"),
    (lambda: mmfast.topk_similarity(A, B, True), TypeError, "k must be an int"),
    (lambda: mmfast.topk_similarity(A, features(6, 5), 1), ValueError, "keys must have the feature size D=3"),
    (lambda: mmfast.topk_similarity(A, B.half(), 1), TypeError, "keys must have the dtype of queries"),
    (lambda: mmfast.topk_similarity(A, B.to("meta"), 1), ValueError, "keys must be on the device of queries"),
    (lambda: mmfast.topk_similarity(A[0], B, 1), ValueError, "queries must be 2-D"),
    (lambda: mmfast.topk_similarity(A.double(), B.double(), 1), TypeError, "queries must be float32"),
    (lambda: mmfast.topk_similarity(A[:0], B, 1), ValueError, "queries is an empty batch"),
    (lambda: mmfast.topk_similarity(A, B, 1, scale=float("nan")), ValueError, "scale must be finite"),
    (lambda: mmfast.topk_similarity(A, B, 1, scale=torch.ones(2)), ValueError, r"scale must have shape \[\] or \[1\]"),
    (lambda: mmfast.topk_similarity(A, B, 1, normalize=1), TypeError, "normalize must be a bool"),
    (lambda: mmfast.topk_similarity(A, B, 1, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: mmfast.similarity([[1.0]], B), TypeError, "a must be a torch.Tensor"),
    (lambda: mmfast.similarity(A, features(6, 2)), ValueError, "b must have the feature size D=3"),
    (lambda: mmfast.similarity(A, B, out_dtype=torch.float64), TypeError, "out_dtype must be float32"),
    (lambda: mmfast.similarity(A, B, scale=float("inf")), ValueError, "scale must be finite"),
    (lambda: mmfast.similarity(A, B[:0]), ValueError, "b is an empty batch"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = r"""
n, m, d, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
q, keys = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)

def warm():  # code paths, lazy imports
    mmfast.topk_similarity(q[:64], keys[:4096], 10, backend=backend)

def step():
    mmfast.topk_similarity(q, keys, 10, backend=backend)
"""


def peak_growth(backend, n, m, d=16):
    """Peak memory of one top-k call beyond what existed before it, in a fresh process."""
    return peak_growth_in_subprocess(MEMORY_SCRIPT, n, m, d, backend)


N_MEM, M_MEM = 4096, 262144
NXM_BYTES = N_MEM * M_MEM * 4  # the fp32 score matrix: 4 GiB


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in FUSED, reason="mmfast._C is not built")
def test_topk_has_no_nxm_buffer():
    """At N = 4096, M = 262144 the score matrix is 4 GiB; the cpu top-k stays under 1/20 of it
    (its extra memory is a tile per thread and the (N, k) outputs: a few MB)."""
    assert peak_growth("cpu", N_MEM, M_MEM) < NXM_BYTES / 20


@pytest.mark.slow
def test_torch_backend_memory_is_chunked():
    """The torch backend's extra memory is a few chunks of 2^22 scores (16 MB each), whatever M: at
    M = 65536 (1 GiB of scores; the full size would take it ~10 s on 2 cores) ~55 MB, under 1/8."""
    assert peak_growth("torch", N_MEM, 65536) < N_MEM * 65536 * 4 / 8


@pytest.mark.slow
def test_memory_measure_sees_an_nxm_buffer():
    """The measurement above can fail: the reference backend, which forms the scores, is caught
    (at M = 8192, where its fp32 matrix is 128 MiB, to keep the test quick)."""
    assert peak_growth("reference", N_MEM, 8192) > N_MEM * 8192 * 4
