"""cross_entropy and linear_cross_entropy on every backend against float64 references (tests/oracle.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.cross_entropy import op
from tests import oracle
from tests.helpers import (FP32_TOL, FUSED, backend_params, loss_and_grads, peak_growth_in_subprocess, rel_err,
                           skip_if_interpreted_and_large)

ALL = backend_params()
KERNELS = backend_params(FUSED)  # the fused backends (the reference is checked against torch itself below)


def targets(t, v, ignored=0.15, seed=0, ignore_index=-100):
    """Random class indices with a fraction of the positions ignored (at least one kept unless ignored == 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (t,), generator=g)
    drop = torch.rand(t, generator=g) < ignored
    if ignored < 1 and bool(drop.all()):
        drop[0] = False
    return torch.where(drop, ignore_index, y)


def randn(*shape, scale=1.0, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def check(outs, refs, tol, names, floor=1e-6):
    """‖out − ref‖ / max(‖ref‖, floor). The floor only matters for V = 1 (loss and gradient are
    exactly 0, computed as lse − x); peaked rows, whose gradients are tiny but must be right, pass
    floor=1e-30: purely relative."""
    for out, ref, name in zip(outs, refs, names):
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        err = rel_err(out, ref, floor=floor)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e}"


# ---------------------------------------------------------------- cross_entropy (logits given)

CE_SHAPES = [(1, 7), (7, 1), (33, 129), (70, 1000), (5, 4099)]
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(label_smoothing=0.2, z_loss=1e-2)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("t,v", CE_SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smooth", "zloss", "both"])
def test_cross_entropy_fp32(backend, t, v, options, reduction="mean"):
    skip_if_interpreted_and_large(backend, t, v, 8)
    x, y = randn(t, v, scale=3.0), targets(t, v, seed=t + v)

    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, reduction=reduction, backend=backend, **options), [x])
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, reduction=reduction,
                                                          eps=options.get("label_smoothing", 0.0),
                                                          z=options.get("z_loss", 0.0)), [x.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_logits"])


def test_oracle_is_torch_cross_entropy():
    """The float64 oracle is F.cross_entropy's definition (mean over kept rows, smoothing as torch)."""
    x, y = randn(50, 33, scale=2.0, dtype=torch.float64), targets(50, 33)
    for eps in (0.0, 0.3):
        for reduction in ("mean", "sum", "none"):
            assert torch.allclose(oracle.masked_lm_loss(x, y, eps=eps, reduction=reduction),
                                  F.cross_entropy(x, y, label_smoothing=eps, reduction=reduction), rtol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_cross_entropy_3d_and_int32_targets(backend):
    x, y = randn(3, 11, 40, scale=2.0), targets(33, 40).reshape(3, 11)
    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y.int(), reduction="none", backend=backend), [x])
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, reduction="none"), [x.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_logits"])


@pytest.mark.parametrize("backend", KERNELS)
def test_cross_entropy_non_default_ignore_index_and_strided_logits(backend):
    """ignore_index may be a class index; logits may be a non-contiguous view."""
    x_full, y = randn(40, 60, scale=2.0), targets(20, 30, ignore_index=3)
    x = x_full[::2, ::2]
    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, ignore_index=3, backend=backend), [x])
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, ignore_index=3), [x.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_logits"])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.15, 1.0])
def test_cross_entropy_reductions_and_ignored(backend, reduction, ignored):
    """0%, 15%, 100% ignored; a batch with every target ignored gives 0 and zero gradients."""
    x, y = randn(40, 50, scale=2.0), targets(40, 50, ignored=ignored)
    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, reduction=reduction, backend=backend), [x])
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, reduction=reduction), [x.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_logits"])
    if ignored == 1.0:
        assert bool((outs[0] == 0).all()) and bool((outs[1] == 0).all())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_inplace_backward(backend, dtype):
    """The gradient is written over the logits: same values as the out-of-place one, same storage."""
    x0, y = randn(2, 20, 300, scale=3.0, dtype=dtype), targets(40, 300).reshape(2, 20)
    expected = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, z_loss=1e-3, backend=backend), [x0])
    x = x0.clone().requires_grad_()
    logits = x * 1  # a non-leaf, as a model's logits are
    loss = mmfast.cross_entropy(logits, y, z_loss=1e-3, inplace_backward=True, backend=backend)
    loss.backward()
    assert rel_err(loss, expected[0]) == 0
    assert rel_err(x.grad, expected[1]) == 0
    assert rel_err(logits, expected[1]) == 0  # the logits' memory now holds the gradient


@pytest.mark.parametrize("backend", KERNELS)
def test_cross_entropy_inplace_backward_guards_logits_needed_elsewhere(backend):
    """Logits that another op saved for its backward cannot be overwritten silently: autograd raises."""
    x = randn(8, 30).requires_grad_()
    logits = x.exp()  # exp saves its output for backward
    loss = mmfast.cross_entropy(logits, targets(8, 30), inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- linear_cross_entropy

LCE_SHAPES = [(1, 7, 5), (9, 1, 3), (37, 129, 33), (300, 1031, 24), (270, 600, 70)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("t,v,d", LCE_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smooth", "zloss", "both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # cpu, torch: gradients formed in forward, or recomputed
def test_linear_cross_entropy_fp32(backend, t, v, d, with_bias, options, reduction):
    skip_if_interpreted_and_large(backend, t, v, d)
    # (300, 1031, 24) with none ignored crosses the CPU kernel's 256-row blocks and 512-column chunks.
    ignored = 0.0 if t == 300 else 0.15
    h, w, y = randn(t, d, seed=2), randn(v, d, scale=d ** -0.5 * 3, seed=3), targets(t, v, ignored, seed=t)
    tensors = [h, w] + ([randn(v, seed=4)] if with_bias else [])
    eps, z = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)

    def ours(h, w, b=None):
        return mmfast.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend, **options)

    def ref(h, w, b=None):
        return oracle.linear_masked_lm_loss(h, w, y, b, eps=eps, z=z, reduction=reduction)

    check(loss_and_grads(ours, tensors), loss_and_grads(ref, [x.double() for x in tensors]), FP32_TOL,
          ["loss", "d_hidden", "d_weight", "d_bias"])


@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
def test_fused_gradients_are_used_once(backend):
    """The fused path scales its saved gradients in place: a second backward through the same graph
    raises instead of returning rescaled gradients; a retained graph's first backward is right."""
    h, w, y = randn(20, 8).requires_grad_(), randn(30, 8).requires_grad_(), targets(20, 30)
    loss = mmfast.linear_cross_entropy(h, w, y, backend=backend)
    (2 * loss).backward(retain_graph=True)
    expected = torch.autograd.grad(2 * oracle.linear_masked_lm_loss(h.double(), w.double(), y), [h])[0]
    assert rel_err(h.grad, expected, floor=1e-30) < FP32_TOL
    with pytest.raises(RuntimeError, match="supports one backward per forward"):
        loss.backward()
    # reduction "none" recomputes in each backward: retained graphs work there
    h.grad = None
    rows = mmfast.linear_cross_entropy(h, w, y, reduction="none", backend=backend)
    loss = rows.sum() / (y != -100).sum()
    (2 * loss).backward(retain_graph=True)
    loss.backward()
    assert rel_err(h.grad, 1.5 * expected, floor=1e-30) < FP32_TOL


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.15, 1.0])
def test_linear_cross_entropy_reductions_3d(backend, reduction, ignored):
    h, w, b = randn(2, 17, 24, seed=2), randn(90, 24, scale=0.5, seed=3), randn(90, seed=4)
    y = targets(34, 90, ignored).reshape(2, 17)
    outs = loss_and_grads(lambda h, w, b: mmfast.linear_cross_entropy(h, w, y, bias=b, reduction=reduction,
                                                                      backend=backend), [h, w, b])
    refs = loss_and_grads(lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, reduction=reduction),
                          [h.double(), w.double(), b.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_hidden", "d_weight", "d_bias"])
    if ignored == 1.0:
        assert all(bool((g == 0).all()) for g in outs)


@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
def test_large_vocabulary(backend):
    """XLM-R's vocabulary (V = 250002): sums over V stay accurate (fp64 carries)."""
    t, v, d = 24, 250002, 16
    h, w, b, y = randn(t, d, seed=2), randn(v, d, scale=0.7, seed=3), randn(v, seed=4), targets(t, v)
    outs = loss_and_grads(lambda h, w, b: mmfast.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1,
                                                                      z_loss=1e-4, backend=backend), [h, w, b])
    refs = loss_and_grads(lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, eps=0.1, z=1e-4),
                          [h.double(), w.double(), b.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_hidden", "d_weight", "d_bias"])
    x = randn(t, v, scale=4.0)
    check(loss_and_grads(lambda x: mmfast.cross_entropy(x, y, backend=backend), [x]),
          loss_and_grads(lambda x: oracle.masked_lm_loss(x, y), [x.double()]), FP32_TOL, ["loss", "d_logits"])


def peaked(t, v, d, seed=5):
    """Hidden rows pointing at their target's weight row: every row has softmax_y = 1 − δ with
    δ < 1e-4 (so softmax_y is 1 in bf16)."""
    w = randn(v, d, seed=seed)
    y = targets(t, v, ignored=0.0, seed=seed)
    h = 0.5 * w[y] + 0.1 * randn(t, d, seed=seed + 1)
    p_y = torch.softmax(h.double() @ w.double().T, 1).gather(1, y[:, None])
    assert float(1 - p_y.min()) < 1e-4
    return h, w, y


@pytest.mark.parametrize("backend", KERNELS)
def test_peaked_rows_fp32(backend):
    """When softmax_y → 1 the whole gradient is the small δ = 1 − softmax_y; fp32 kernels that form
    softmax_y − 1 lose it, ours form it as expm1 of an fp64 lse (torch's own fp32 errs ~1e-2 here)."""
    h, w, y = peaked(40, 200, 64)
    x = (h.double() @ w.double().T).float()
    check(loss_and_grads(lambda h, w: mmfast.linear_cross_entropy(h, w, y, backend=backend), [h, w]),
          loss_and_grads(lambda h, w: oracle.linear_masked_lm_loss(h, w, y), [h.double(), w.double()]),
          FP32_TOL, ["loss", "d_hidden", "d_weight"], floor=1e-30)
    check(loss_and_grads(lambda x: mmfast.cross_entropy(x, y, backend=backend), [x]),
          loss_and_grads(lambda x: oracle.masked_lm_loss(x, y), [x.double()]), FP32_TOL, ["loss", "d_logits"],
          floor=1e-30)


@pytest.mark.parametrize("backend", KERNELS)
def test_peaked_rows_bf16_keep_the_target_gradient(backend):
    """bf16 inputs whose target probability is 1 in bf16: a kernel that forms softmax in bf16 loses
    the gradient (softmax_y − 1 = 0); ours computes in fp32 and keeps it to bf16's output precision."""
    h, w, y = peaked(40, 200, 64)
    hb, wb = h.bfloat16(), w.bfloat16()
    refs = loss_and_grads(lambda h, w: oracle.linear_masked_lm_loss(h, w, y), [hb.double(), wb.double()])
    outs = loss_and_grads(lambda h, w: mmfast.linear_cross_entropy(h, w, y, backend=backend), [hb, wb])
    check(outs[1:], refs[1:], 1e-2, ["d_hidden", "d_weight"], floor=1e-30)
    x = (hb.double() @ wb.double().T).bfloat16()
    ref_dx = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y), [x.double()])[1]
    check(loss_and_grads(lambda x: mmfast.cross_entropy(x, y, backend=backend), [x])[1:], [ref_dx], 1e-2,
          ["d_logits"], floor=1e-30)
    # What a kernel that forms softmax in bf16 and subtracts the one-hot gets: the gradient is lost.
    naive = (torch.softmax(x.float(), 1).bfloat16() - F.one_hot(y, x.shape[1]).bfloat16()) / x.shape[0]
    assert rel_err(naive, ref_dx, floor=1e-30) > 0.5


@pytest.mark.parametrize("backend", ALL)
def test_bf16_within_twice_eager_error(backend):
    """design.md §4: bf16 within twice PyTorch's own bf16 error against float64."""
    h, w, b = randn(40, 48, seed=2, dtype=torch.bfloat16), randn(300, 48, scale=0.4, seed=3, dtype=torch.bfloat16), \
        randn(300, seed=4, dtype=torch.bfloat16)
    y = targets(40, 300)
    refs = loss_and_grads(lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b), [h.double(), w.double(), b.double()])
    eager = loss_and_grads(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), y), [h, w, b])
    outs = loss_and_grads(lambda h, w, b: mmfast.linear_cross_entropy(h, w, y, bias=b, backend=backend), [h, w, b])
    for out, e, r, name in zip(outs, eager, refs, ["loss", "d_hidden", "d_weight", "d_bias"]):
        assert out.dtype == (torch.float32 if name == "loss" else e.dtype), name  # losses are fp32
        assert rel_err(out, r, floor=1e-30) <= 2 * rel_err(e, r, floor=1e-30) + 1e-6, name


@pytest.mark.parametrize("backend", KERNELS)
def test_autocast_forward_then_fp32_backward(backend):
    """Under autocast the op still computes in fp32: the saved lse and the recomputed logits agree."""
    h, w, y = randn(30, 40, seed=2), randn(100, 40, scale=0.3, seed=3), targets(30, 100)
    expected = loss_and_grads(lambda h, w: mmfast.linear_cross_entropy(h, w, y, backend=backend), [h, w])

    def under_autocast(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mmfast.linear_cross_entropy(h, w, y, backend=backend)

    check(loss_and_grads(under_autocast, [h, w]), expected, FP32_TOL, ["loss", "d_hidden", "d_weight"])


# ---------------------------------------------------------------- layouts, masks and block edges

@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
def test_sliced_fp32_logits_are_left_unchanged(backend):
    """A padded vocabulary sliced to size (padded[:, :V]): at V > 2^20 the cpu backend's blocks are
    one row each, and a one-row block of a strided tensor is contiguous. The gradient must go to
    new memory, never into the caller's logits."""
    t, v = 3, (1 << 20) + 1
    padded = randn(t, v + 7, scale=2.0).requires_grad_()
    before = padded.detach().clone()
    y = targets(t, v, ignored=0.0)
    loss = mmfast.cross_entropy(padded[:, :v], y, backend=backend)
    loss.backward()
    assert torch.equal(padded.detach(), before)
    ref = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y), [before[:, :v].double()])
    check([loss, padded.grad[:, :v]], ref, FP32_TOL, ["loss", "d_logits"])
    assert bool((padded.grad[:, v:] == 0).all())


@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
@pytest.mark.parametrize("layout", ["bf16", "transposed"])
def test_cross_entropy_converted_rows_cross_blocks(backend, layout):
    """bf16 and non-unit-stride logits are converted to fp32 in blocks of 2^21 // V rows on the cpu
    backend (31 rows at V = 65539): 70 rows cross two block edges, with targets in every block."""
    t, v = 70, (1 << 16) + 3
    x = randn(v, t, scale=3.0).T if layout == "transposed" else randn(t, v, scale=3.0, dtype=torch.bfloat16)
    y = targets(t, v, ignored=0.1, seed=5)
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, eps=0.1), [x.double()])
    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, label_smoothing=0.1, backend=backend), [x])
    tol = FP32_TOL if layout == "transposed" else 2e-3  # bf16 gradients: rounded to 8 bits
    check(outs, refs, tol, ["loss", "d_logits"])


def masked_vocabulary(v, chunks):
    """A bias (V,) of ones with −inf on whole vocabulary chunks [c0, c1): masked (padded) entries."""
    bias = torch.ones(v)
    for c0, c1 in chunks:
        bias[c0:c1] = float("-inf")
    return bias


# Whole −inf tiles: the cpu tile walk's 512-column chunks and the interpreter's 32-wide triton tiles.
MASKED = [(32, 64), (512, 1024), (1400, 1500)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # cpu, torch: gradients formed in forward, or recomputed
def test_linear_cross_entropy_masked_vocabulary_tiles(backend, reduction):
    """A −inf bias on whole vocabulary tiles (padding masked out): finite loss and gradients, as
    the float64 reference; every online (max, sum of exp) merge must treat a −inf tile as empty."""
    t, v, d = 6, 1500, 8
    bias = masked_vocabulary(v, MASKED)
    y = torch.randint(64, 512, (t,), generator=torch.Generator().manual_seed(0))
    tensors = [randn(t, d, seed=2), randn(v, d, scale=0.5, seed=3), bias]

    def ours(h, w, b):
        return mmfast.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend)

    outs = loss_and_grads(ours, tensors)
    refs = loss_and_grads(lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, reduction=reduction),
                          [x.double() for x in tensors])
    assert all(bool(torch.isfinite(o).all()) for o in outs)
    check(outs, refs, FP32_TOL, ["loss", "d_hidden", "d_weight", "d_bias"])


@pytest.mark.parametrize("backend", ALL)
def test_cross_entropy_masked_logits(backend):
    """−inf logits, whole chunks of them (a row's 32-wide triton chunk, half a row): finite results."""
    x = randn(5, 300, scale=2.0) + masked_vocabulary(300, [(32, 64), (150, 300)]) - 1
    y = torch.tensor([0, 70, 149, 3, -100])
    outs = loss_and_grads(lambda x: mmfast.cross_entropy(x, y, z_loss=1e-3, backend=backend), [x])
    refs = loss_and_grads(lambda x: oracle.masked_lm_loss(x, y, z=1e-3), [x.double()])
    check(outs, refs, FP32_TOL, ["loss", "d_logits"])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_class_valued_ignore_index(backend, reduction):
    """ignore_index = 3, a real class: rows whose target is 3 are ignored, the others kept."""
    t, v, d = 40, 70, 12
    y = targets(t, v, ignored=0.0, seed=7)
    y[::3] = 3
    tensors = [randn(t, d, seed=2), randn(v, d, scale=0.5, seed=3), randn(v, seed=4)]

    def ours(h, w, b):
        return mmfast.linear_cross_entropy(h, w, y, bias=b, ignore_index=3, reduction=reduction, backend=backend)

    refs = loss_and_grads(lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, ignore_index=3, reduction=reduction),
                          [x.double() for x in tensors])
    check(loss_and_grads(ours, tensors), refs, FP32_TOL, ["loss", "d_hidden", "d_weight", "d_bias"])


@pytest.mark.parametrize("backend", ALL)
def test_numpy_scalars_are_options(backend):
    x, y = randn(6, 10), targets(6, 10)
    expected = mmfast.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    got = mmfast.cross_entropy(x, y, label_smoothing=np.float32(0.1), z_loss=np.float64(1e-3),
                               ignore_index=np.int64(-100), backend=backend)
    assert rel_err(got, expected) < 1e-7


# ---------------------------------------------------------------- bad input

def test_bad_inputs():
    x, h, w, y = randn(6, 10), randn(6, 4), randn(10, 4), targets(6, 10)
    cases = [
        (lambda: mmfast.cross_entropy(x, torch.full((6,), 10)), ValueError, "target values must be in"),
        (lambda: mmfast.cross_entropy(x, torch.full((6,), -1)), ValueError, "target values must be in"),
        (lambda: mmfast.cross_entropy(x, y.float()), TypeError, "target must hold class indices"),
        (lambda: mmfast.cross_entropy(x, y[:5]), ValueError, r"target must have shape \(6,\)"),
        (lambda: mmfast.cross_entropy(x[0], y), ValueError, "logits must be"),
        (lambda: mmfast.cross_entropy(x.double(), y), TypeError, "logits must be float32"),
        (lambda: mmfast.cross_entropy(x, y, label_smoothing=1.0), ValueError, "label_smoothing"),
        (lambda: mmfast.cross_entropy(x, y, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: mmfast.cross_entropy(x, y, reduction="avg"), ValueError, "reduction"),
        (lambda: mmfast.cross_entropy(x[:, ::2], y.clamp(max=4), inplace_backward=True), ValueError, "contiguous"),
        (lambda: mmfast.cross_entropy(x, y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: mmfast.linear_cross_entropy(h, randn(10, 5), y), ValueError, r"weight must be \(V, Dh\) with Dh = 4"),
        (lambda: mmfast.linear_cross_entropy(h, w, torch.full((6,), 10)), ValueError, r"in \[0, 10\)"),
        (lambda: mmfast.linear_cross_entropy(h, w.bfloat16(), y), TypeError, "weight must have hidden's dtype"),
        (lambda: mmfast.linear_cross_entropy(h, w, y, bias=randn(9)), ValueError, r"bias must be a tensor of shape \(10,\)"),
        (lambda: mmfast.linear_cross_entropy(h, w, y, bias=randn(10).bfloat16()), TypeError, "bias must have"),
        (lambda: mmfast.linear_cross_entropy(h, w, y[None]), ValueError, "target must have shape"),
        (lambda: mmfast.linear_cross_entropy(h, w, y, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: mmfast.cross_entropy(x, y.to("meta")), ValueError, "target must be on the device of logits"),
        (lambda: mmfast.linear_cross_entropy(h, w, y.to("meta")), ValueError, "target must be on the device of hidden"),
        (lambda: mmfast.linear_cross_entropy(h[:, :0], w[:, :0], y), ValueError, "hidden has hidden size Dh = 0"),
        (lambda: mmfast.cross_entropy(x, y, ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
        (lambda: mmfast.cross_entropy(x, torch.tensor([-100, 1, 2, 3, 4, 5], dtype=torch.int32), ignore_index=-2**40),
         ValueError, "target values must be in"),
        (lambda: mmfast.cross_entropy(x, y, ignore_index=np.float32(3)), TypeError, "ignore_index must be an int"),
        (lambda: mmfast.cross_entropy(x, y, label_smoothing=np.float32(1.5)), ValueError, "label_smoothing"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


@pytest.mark.parametrize("backend", ALL)
def test_nan_logits_give_nan_loss(backend):
    x, y = randn(5, 20), targets(5, 20, ignored=0.0)
    x[2, 3] = float("nan")
    assert torch.isnan(mmfast.cross_entropy(x, y, backend=backend))


# ---------------------------------------------------------------- registration: opcheck, compile

@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    x, h, w, b = randn(9, 40), randn(9, 12), randn(40, 12, scale=0.3), randn(40)
    y = torch.where(targets(9, 40) < 0, -1, targets(9, 40))
    lse = op.linear_cross_entropy(h, w, b, y, 0.1, 1e-3, backend)[1]
    cases = [
        (op.cross_entropy, (x, y, 0.1, 1e-3, False, backend)),
        (op.cross_entropy_backward, (x, y, torch.rand(9), 0.1, 1e-3, backend)),
        (op.linear_cross_entropy, (h, w, b, y, 0.1, 1e-3, backend)),
        (op.linear_cross_entropy, (h, w, None, y, 0.0, 0.0, backend)),
        (op.linear_cross_entropy_backward, (h, w, b, y, lse, torch.rand(9), 0.1, 1e-3, backend)),
    ]
    if backend in op.FUSED:
        cases.append((op.linear_cross_entropy_fused, (h, w, b, y, torch.rand(9), 0.1, 1e-3, backend)))
    for fn, args in cases:
        torch.library.opcheck(fn, args)
    # The differentiable ops with inputs that require grad: their autograd registration (their
    # backward ops themselves have none: double backward raises rather than returning zeros).
    grad_args = [(op.cross_entropy, (x.clone().requires_grad_(), y, 0.1, 1e-3, False, backend)),
                 (op.linear_cross_entropy, (h.clone().requires_grad_(), w.clone().requires_grad_(),
                                            b.clone().requires_grad_(), y, 0.1, 1e-3, backend))]
    for fn, args in grad_args:
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    h, w, b, y = randn(2, 9, 16), randn(50, 16, scale=0.3), randn(50), targets(18, 50).reshape(2, 9)

    def step(h, w, b):
        logits = F.linear(h, w, b)
        return (mmfast.linear_cross_entropy(h, w, y, bias=b, z_loss=1e-3, backend=backend)
                + mmfast.cross_entropy(logits, y, label_smoothing=0.1, backend=backend))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    check(loss_and_grads(compiled, [h, w, b]), loss_and_grads(step, [h, w, b]), 1e-6,
          ["loss", "d_hidden", "d_weight", "d_bias"])


# ---------------------------------------------------------------- nn modules

def test_masked_lm_head():
    torch.manual_seed(0)
    head = mmfast.nn.MaskedLMHead(24, 70, backend="torch")
    h, y = randn(2, 9, 24), targets(18, 70).reshape(2, 9)
    loss = head(h, y)
    expected = F.cross_entropy(head.logits(h).reshape(-1, 70), y.reshape(-1))
    assert head.logits(h).shape == (2, 9, 70)
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None


def test_masked_lm_head_tied_weight():
    embedding = torch.nn.Embedding(70, 24)
    head = mmfast.nn.MaskedLMHead(24, 70, bias=False, tied_weight=embedding.weight)
    assert head.weight is embedding.weight and head.bias is None
    head(randn(5, 24), targets(5, 70)).backward()
    assert embedding.weight.grad is not None
    with pytest.raises(ValueError, match="tied_weight must be"):
        mmfast.nn.MaskedLMHead(24, 71, tied_weight=embedding.weight)


def test_linear_cross_entropy_loss_module():
    h, w, y = randn(7, 8), randn(20, 8), targets(7, 20)
    module = mmfast.nn.LinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    expected = mmfast.linear_cross_entropy(h, w, y, label_smoothing=0.1, reduction="sum")
    assert module(h, w, y).item() == expected.item()
    assert "label_smoothing=0.1" in repr(module)


# ---------------------------------------------------------------- memory

T_MEM, V_MEM = 8192, 30522
TV_BYTES = T_MEM * V_MEM * 4  # one T×V fp32 buffer: 1 GB

LINEAR_SCRIPT = r"""
t, v, d, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
h = torch.randn(t, d, generator=g).requires_grad_()
w = torch.randn(v, d, generator=g).mul_(d ** -0.5).requires_grad_()
y = torch.randint(0, v, (t,), generator=g)
y[torch.rand(t, generator=g) >= 0.15] = -100

def warm():
    mmfast.linear_cross_entropy(h[:64], w[:100], y[:64].clamp(max=99), backend=backend).backward()
    h.grad = w.grad = None

def step():
    mmfast.linear_cross_entropy(h, w, y, backend=backend).backward()
"""

LOGITS_SCRIPT = r"""
t, v, backend, inplace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
g = torch.Generator().manual_seed(0)
x = torch.randn(t, v, generator=g).requires_grad_()
y = torch.randint(0, v, (t,), generator=g)

def warm():
    logits = x[:8] * 1
    mmfast.cross_entropy(logits, y[:8], inplace_backward=inplace, backend=backend).backward()
    x.grad = None

def step():
    logits = x.detach()  # the logits as a model's last op leaves them (the input of the loss)
    logits.requires_grad_()
    mmfast.cross_entropy(logits, y, inplace_backward=inplace, backend=backend).backward()
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])  # triton: the gpu tier
def test_linear_cross_entropy_allocates_no_txv_buffer(backend):
    """T = 8192, V = 30522 (BERT), Dh = 64: the gradients (dW 7.8 MB, dH 2 MB) and a few tiles."""
    assert peak_growth_in_subprocess(LINEAR_SCRIPT, T_MEM, V_MEM, 64, backend) < TV_BYTES / 8


@pytest.mark.slow
def test_memory_measure_sees_the_logits():
    """The measurement above can fail: the reference backend, which forms the logits, is caught."""
    assert peak_growth_in_subprocess(LINEAR_SCRIPT, T_MEM, V_MEM, 64, "reference") > TV_BYTES / 8


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
def test_cross_entropy_memory(backend):
    """Logits given (T = 2048, V = 30522: 250 MB): in place, the backward allocates no T×V buffer;
    otherwise exactly one, the gradient itself (no softmax or log-softmax buffer besides)."""
    t = 2048
    tv_bytes = t * V_MEM * 4
    inplace = peak_growth_in_subprocess(LOGITS_SCRIPT, t, V_MEM, backend, 1)
    out_of_place = peak_growth_in_subprocess(LOGITS_SCRIPT, t, V_MEM, backend, 0)
    assert inplace < tv_bytes / 8, inplace
    assert tv_bytes * 0.9 < out_of_place < tv_bytes * 1.2, out_of_place
