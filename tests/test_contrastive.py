"""clip_loss, infonce_loss, siglip_loss on every backend against float64 references (tests/oracle.py)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfast
from mmfast.contrastive.op import contrastive_stats
from tests import oracle
from tests.helpers import (FP32_TOL, FUSED, INTERPRETED, backend_params, features, fp32_tolerances,
                           loss_and_grads, peak_growth_in_subprocess, rel_err, skip_if_interpreted_and_large)

ALL = backend_params()


def bf16_tolerance(fn_eager, fn_ref, tensors_lo):
    """design.md §4: bf16/fp16 within twice the error of PyTorch eager in that dtype (per output)."""
    eager = loss_and_grads(fn_eager, tensors_lo)
    ref = loss_and_grads(fn_ref, [t.double() for t in tensors_lo])
    return [2 * rel_err(e, r) + 1e-6 for e, r in zip(eager, ref)], ref


def assert_close(outs, refs, tols, names, scale=1.0):
    """The loss and the feature gradients are sums of terms of the logits' size (the scale), so the
    norm floor below which errors count absolutely is 0.1·scale (see helpers.rel_err)."""
    for out, ref, tol, name in zip(outs, refs, tols, names):
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        err = rel_err(out, ref, floor=0.1 * max(1.0, float(scale)))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e}"


# ---------------------------------------------------------------- clip_loss

# Every path crosses every block it has: (300, 64) the cpu kernel's 256×256 tiles, (1100, 8) also
# the torch backend's chunks of 2^20 logits (the triton interpreter's 32-wide tiles: most shapes).
CLIP_SHAPES = [(1, 1), (2, 3), (7, 33), (40, 70), (65, 33), (129, 130), (300, 64), (1100, 8)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,d", CLIP_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_fp32(backend, n, d, with_bias):
    skip_if_interpreted_and_large(backend, n, n, d)
    a, b = features(n, d), features(n, d)
    scale, bias = torch.tensor(13.7), (torch.tensor([-1.3]) if with_bias else None)
    tensors = [a, b, scale] + ([bias] if with_bias else [])

    def ours(a, b, s, bi=None, backend=backend):
        return mmfast.clip_loss(a, b, s, logit_bias=bi, backend=backend)

    def ref(a, b, s, bi=None):
        return oracle.clip_loss(a, b, s, bi)

    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    out, exp = loss_and_grads(ours, tensors), loss_and_grads(ref, [t.double() for t in tensors])
    tols = fp32_tolerances(lambda *t: ours(*t, backend="reference"), exp, tensors)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    # db is 0 in exact arithmetic (the bias cancels in both softmaxes): compare absolutely.
    if with_bias:
        assert abs(out[4].item()) < 1e-5
        out, exp = out[:4], exp[:4]
    assert_close(out, exp, tols[:4], names, scale=13.7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_loss_reductions_and_smoothing(backend, reduction, eps):
    a, b, scale = features(37, 21), features(37, 21), torch.tensor(9.0)

    def ours(a, b, s):
        return mmfast.clip_loss(a, b, s, label_smoothing=eps, reduction=reduction, backend=backend)

    out = loss_and_grads(ours, [a, b, scale])
    exp = loss_and_grads(lambda a, b, s: oracle.clip_loss(a, b, s, eps=eps, reduction=reduction),
                         [a.double(), b.double(), scale.double()])
    assert out[0].shape == ((37,) if reduction == "none" else ())
    assert_close(out, exp, [FP32_TOL] * 4, ["loss", "d_image", "d_text", "d_scale"], scale=9.0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(65, 48), (300, 24)])
def test_clip_loss_half_precision(backend, dtype, n, d):
    skip_if_interpreted_and_large(backend, n, n, d)
    a, b, scale = features(n, d, dtype), features(n, d, dtype), torch.tensor(20.0)

    tols, ref = bf16_tolerance(oracle.eager_clip_loss, lambda a, b, s: oracle.clip_loss(a, b, s), [a, b, scale])
    out = loss_and_grads(lambda a, b, s: mmfast.clip_loss(a, b, s, backend=backend), [a, b, scale])
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype
    assert_close(out, ref, tols, ["loss", "d_image", "d_text", "d_scale"], scale=20.0)


@pytest.mark.parametrize("backend", ALL)
def test_clip_loss_large_scale_and_near_duplicates(backend):
    a = features(50, 32)
    b = a + 1e-4 * features(50, 32)  # every text nearly equals its image and its neighbours' are close
    a[1] = a[0] + 1e-5 * a[1]  # two nearly identical images
    scale = torch.tensor(100.0)
    out = loss_and_grads(lambda a, b, s: mmfast.clip_loss(a, b, s, backend=backend), [a, b, scale])
    exp = loss_and_grads(lambda a, b, s: oracle.clip_loss(a, b, s), [a.double(), b.double(), scale.double()])
    tols = fp32_tolerances(lambda a, b, s: mmfast.clip_loss(a, b, s, backend="reference"), exp, [a, b, scale])
    assert_close(out, exp, tols, ["loss", "d_image", "d_text", "d_scale"], scale=100.0)


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_inputs(backend):
    big_a, big_b = features(80, 70), features(40, 90)
    a, b = big_a[::2, :45], big_b[:, ::2]  # strided rows and a sliced row; a column-strided view
    assert not a.is_contiguous() and not b.is_contiguous()
    out = loss_and_grads(lambda a, b: mmfast.clip_loss(a, b, 11.0, backend=backend), [a, b])
    exp = loss_and_grads(lambda a, b: oracle.clip_loss(a, b, 11.0), [a.double(), b.double()])
    assert_close(out, exp, [FP32_TOL] * 3, ["loss", "d_image", "d_text"], scale=11.0)


@pytest.mark.parametrize("backend", ALL)
def test_float_scale_and_bias_need_no_grad(backend):
    a, b = features(9, 5), features(9, 5)
    loss = mmfast.clip_loss(a, b, 3.0, logit_bias=0.5, backend=backend)
    assert abs(loss.item() - oracle.clip_loss(a, b, 3.0, 0.5).item()) < 1e-5


@pytest.mark.parametrize("backend", ALL)
def test_nan_features_give_nan_loss(backend):
    a, b = features(20, 8), features(20, 8)
    a[3, 2] = float("nan")
    assert torch.isnan(mmfast.clip_loss(a, b, 5.0, backend=backend))
    assert torch.isnan(mmfast.siglip_loss(a, b, 5.0, -1.0, backend=backend))
    assert torch.isnan(mmfast.infonce_loss(a, b, 5.0, backend=backend))


# ---------------------------------------------------------------- infonce_loss

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,m,k,d", [(1, 1, 0, 1), (5, 9, 11, 7), (64, 33, 0, 130), (40, 300, 129, 16),
                                     (1100, 1000, 300, 4)])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_infonce_labels_and_negatives(backend, n, m, k, d, eps):
    skip_if_interpreted_and_large(backend, n, m + k, d)
    q, keys = features(n, d), features(m, d)
    labels = torch.randint(0, m, (n,))
    tensors = [q, keys, torch.tensor(17.0)] + ([features(k, d)] if k else [])

    def ours(q, keys, s, neg=None, backend=backend):
        return mmfast.infonce_loss(q, keys, s, labels=labels, negatives=neg, label_smoothing=eps, backend=backend)

    def ref(q, keys, s, neg=None):
        return oracle.infonce_loss(q, keys, s, labels, neg, eps)

    names = ["loss", "d_query", "d_keys", "d_scale", "d_negatives"]
    exp = loss_and_grads(ref, [t.double() for t in tensors])
    tols = fp32_tolerances(lambda *t: ours(*t, backend="reference"), exp, tensors)
    assert_close(loss_and_grads(ours, tensors), exp, tols, names, scale=17.0)


@pytest.mark.parametrize("backend", ALL)
def test_infonce_negatives_without_grad_get_none(backend):
    q, keys, neg = features(6, 8).requires_grad_(), features(6, 8), features(10, 8)
    loss = mmfast.infonce_loss(q, keys, 4.0, negatives=neg, reduction="none", backend=backend)
    assert loss.shape == (6,)
    loss.sum().backward()
    assert neg.grad is None and keys.grad is None and q.grad is not None
    exp = oracle.infonce_loss(q.detach(), keys, 4.0, negatives=neg, reduction="none")
    assert rel_err(loss, exp) < FP32_TOL


# ---------------------------------------------------------------- siglip_loss

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 7, 33), (129, 129, 5), (40, 300, 64), (1100, 1100, 4)])
def test_siglip_loss(backend, n, m, d):
    skip_if_interpreted_and_large(backend, n, m, d)
    a, b = features(n, d), features(m, d)
    tensors = [a, b, torch.tensor(10.0), torch.tensor(-10.0)]
    out = loss_and_grads(lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend=backend), tensors)
    exp = loss_and_grads(oracle.siglip_loss, [t.double() for t in tensors])
    tols = fp32_tolerances(lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend="reference"), exp, tensors)
    assert_close(out, exp, tols, ["loss", "d_image", "d_text", "d_scale", "d_bias"], scale=10.0)


# ---------------------------------------------------------------- randomised shapes

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300), m_extra=st.integers(0, 40), d=st.integers(1, 130),
    loss=st.sampled_from(["clip", "infonce", "siglip"]), backend=st.sampled_from(FUSED),
    scale=st.floats(0.5, 100.0), seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_oracle(n, m_extra, d, loss, backend, scale, seed):
    if backend == "triton" and INTERPRETED:  # the same draws, shrunk to the interpreter's reach
        n, m_extra, d = 1 + n % 70, m_extra % 20, 1 + d % 40
    torch.manual_seed(seed)
    m = n if loss == "clip" else n + m_extra
    a, b, s, bias = features(n, d), features(m, d), torch.tensor(scale), torch.tensor(-2.5)
    fn = {"clip": mmfast.clip_loss, "infonce": mmfast.infonce_loss, "siglip": mmfast.siglip_loss}[loss]
    ref = {"clip": oracle.clip_loss, "infonce": oracle.infonce_loss, "siglip": oracle.siglip_loss}[loss]
    tensors = [a, b, s, bias] if loss == "siglip" else [a, b, s]

    def ours(*t, backend=backend):
        return fn(*t, backend=backend)

    out, exp = loss_and_grads(ours, tensors), loss_and_grads(ref, [t.double() for t in tensors])
    tols = fp32_tolerances(lambda *t: ours(*t, backend="reference"), exp, tensors)
    assert_close(out, exp, tols, ["loss", "d_a", "d_b", "d_scale", "d_bias"], scale=scale)


# ---------------------------------------------------------------- peers

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,d", [(1, 4), (33, 17), (256, 512)])
def test_matches_open_clip_in_float64(backend, n, d):
    skip_if_interpreted_and_large(backend, n, n, d)
    oc = oracle.open_clip_loss_module()
    if oc is None:
        pytest.skip("open-clip-torch is not installed (make setup installs it)")
    a, b = features(n, d), features(n, d)
    s, bias = torch.tensor(30.0), torch.tensor(-5.0)
    ours = loss_and_grads(lambda a, b, s: mmfast.nn.ClipLoss(backend=backend)(a, b, s), [a, b, s])
    theirs = loss_and_grads(lambda a, b, s: oc.ClipLoss()(a, b, s), [a.double(), b.double(), s.double()])
    assert_close(ours, theirs, [FP32_TOL] * 4, ["loss", "d_image", "d_text", "d_scale"], scale=30.0)
    ours = loss_and_grads(lambda a, b, s, bi: mmfast.nn.SigLipLoss(backend=backend)(a, b, s, bi), [a, b, s, bias])
    theirs = loss_and_grads(lambda a, b, s, bi: oc.SigLipLoss()(a, b, s, bi),
                            [a.double(), b.double(), s.double(), bias.double()])
    assert_close(ours, theirs, [FP32_TOL] * 5, ["loss", "d_image", "d_text", "d_scale", "d_bias"], scale=30.0)


def test_nn_modules_are_drop_ins():
    a, b = features(8, 4), features(8, 4)
    out = mmfast.nn.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)(
        a, b, 2.0, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].shape == ()
    out = mmfast.nn.SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)(a, b, 2.0, -1.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="world_size=2 needs an initialised default process group"):
        mmfast.nn.ClipLoss(world_size=2)
    with pytest.raises(ValueError, match="world_size=4 needs"):
        mmfast.nn.SigLipLoss(world_size=4)
    with pytest.raises(ValueError, match="dist_impl='ring' computes open_clip's local_loss=True"):
        mmfast.nn.ClipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        mmfast.nn.SigLipLoss(dist_impl="allgather")


# ---------------------------------------------------------------- registration: opcheck, compile

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sigmoid,with_cols", [(False, True), (False, False), (True, False)])
def test_opcheck(backend, sigmoid, with_cols):
    a, b = features(19, 12).requires_grad_(), features(23, 12).requires_grad_()
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    positives = torch.randint(-2, 25, (19,))  # some rows without a positive column
    torch.library.opcheck(contrastive_stats, (a, b, scale, bias, positives, sigmoid, with_cols, backend))
    torch.library.opcheck(contrastive_stats, (a, b, scale, None, None, sigmoid, with_cols, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(a, b, s, bi):
        return mmfast.clip_loss(a, b, s, backend=backend) + mmfast.siglip_loss(a, b, s, bi, backend=backend)

    tensors = [features(33, 16), features(33, 16), torch.tensor(7.0), torch.tensor(-3.0)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, exp = loss_and_grads(compiled, tensors), loss_and_grads(step, tensors)
    assert_close(out, exp, [1e-6] * 5, ["loss", "d_a", "d_b", "d_scale", "d_bias"])


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_inductor_with_transposed_inputs(backend):
    """Inductor checks the real outputs' strides against the fakes': transposed features catch a mismatch."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, s: mmfast.clip_loss(a.t(), b.t(), s, backend=backend), fullgraph=True)
    tensors = [features(8, 17).contiguous(), features(8, 17).contiguous(), torch.tensor(5.0)]
    out = loss_and_grads(fn, tensors)
    exp = loss_and_grads(lambda a, b, s: oracle.clip_loss(a.t(), b.t(), s), [t.double() for t in tensors])
    assert_close(out, exp, [FP32_TOL] * 4, ["loss", "d_a", "d_b", "d_scale"], scale=5.0)


@pytest.mark.parametrize("backend", ALL)
def test_autocast_forward_then_fp32_backward(backend):
    """The usual AMP pattern: forward under autocast, backward outside it. The fused backends
    compute in fp32 whatever the autocast state, so forward and backward agree."""
    a, b, s = features(64, 32), features(64, 32), torch.tensor(100.0)
    leaves = [t.clone().requires_grad_() for t in (a, b, s)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mmfast.clip_loss(*leaves, label_smoothing=0.1, backend=backend)
    out = [loss] + list(torch.autograd.grad(loss, leaves))
    exp = loss_and_grads(lambda a, b, s: oracle.clip_loss(a, b, s, eps=0.1), [t.double() for t in (a, b, s)])
    # the reference backend is autocast's own bf16 computation: held to 5% (bf16 logits at scale 100)
    tol = 5e-2 if backend == "reference" else FP32_TOL
    assert_close(out, exp, [tol] * 4, ["loss", "d_a", "d_b", "d_scale"], scale=100.0)


@pytest.mark.parametrize("backend", ALL)
def test_siglip_confident_batch_keeps_precision(backend):
    """A well-trained SigLIP batch: positives at σ ≈ 1, negatives at σ ≈ 0, the loss ~1e-5. The
    positives' terms must not come out of a cancellation (softplus(z) − z) or a log(1 + tiny)."""
    a = features(48, 256)  # D = 256: negatives nearly orthogonal, z ≈ 40·(±0.2) − 25
    b = a + 0.05 * features(48, 256)
    tensors = [a, b / b.norm(dim=1, keepdim=True), torch.tensor(40.0), torch.tensor(-25.0)]
    out = loss_and_grads(lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend=backend), tensors)
    exp = loss_and_grads(oracle.siglip_loss, [t.double() for t in tensors])
    assert exp[0].item() < 1e-3
    for o, e, name in zip(out, exp, ["loss", "d_image", "d_text", "d_scale", "d_bias"]):
        err = rel_err(o, e, floor=0.0)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------- frozen towers, scalar forms

def frozen_tower_cases():
    """(name, loss fn of the tensors, tensors, which of them require grad): only the temperature
    and bias (temperature calibration, both towers frozen), or only a negative bank and the scale."""
    a, b, neg = features(9, 6), features(9, 6), features(11, 6)
    s, bias = torch.tensor(7.0), torch.tensor([-2.0])
    return [
        ("clip", lambda a, b, s, bi, be: mmfast.clip_loss(a, b, s, logit_bias=bi, backend=be),
         lambda a, b, s, bi: oracle.clip_loss(a, b, s, bi), [a, b, s, bias], [False, False, True, True]),
        ("siglip", lambda a, b, s, bi, be: mmfast.siglip_loss(a, b, s, bi, backend=be), oracle.siglip_loss,
         [a, b, s, bias], [False, False, True, True]),
        ("infonce", lambda q, k, s, n, be: mmfast.infonce_loss(q, k, s, negatives=n, backend=be),
         lambda q, k, s, n: oracle.infonce_loss(q, k, s, negatives=n), [a, b, s, neg], [False, False, True, True]),
        ("infonce-bank-only", lambda q, k, s, n, be: mmfast.infonce_loss(q, k, s, negatives=n, backend=be),
         lambda q, k, s, n: oracle.infonce_loss(q, k, s, negatives=n), [a, b, s, neg], [False, False, False, True]),
    ]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", range(4), ids=["clip", "siglip", "infonce", "infonce-bank-only"])
def test_frozen_towers(backend, case):
    """Gradients for only the scale/bias or only the negative bank: the others get none (and the op's
    empty gradient outputs must be distinct tensors, or the custom-op machinery raises)."""
    name, ours, ref, tensors, wanted = frozen_tower_cases()[case]
    leaves = [t.clone().requires_grad_(w) for t, w in zip(tensors, wanted)]
    loss = ours(*leaves, backend)
    loss.backward()
    ref_leaves = [t.double().requires_grad_(w) for t, w in zip(tensors, wanted)]
    ref(*ref_leaves).backward()
    assert rel_err(loss, ref(*[t.detach() for t in ref_leaves])) < FP32_TOL
    for leaf, ref_leaf, w in zip(leaves, ref_leaves, wanted):
        assert (leaf.grad is not None) == w, name
        if w:
            assert rel_err(leaf.grad, ref_leaf.grad) < FP32_TOL, name


@pytest.mark.parametrize("backend", ALL)
def test_scale_and_bias_forms_agree(backend):
    """A float, an int, NumPy float32/float64 scalars, 0-d and [1] tensors: the same loss."""
    a, b = features(5, 4), features(5, 4)
    forms = [2.0, 2, np.float32(2.0), np.float64(2.0), torch.tensor(2.0), torch.tensor([2.0])]
    losses = [mmfast.clip_loss(a, b, s, logit_bias=np.float32(-1.0), backend=backend) for s in forms]
    assert all(torch.equal(loss, losses[0]) for loss in losses)


def test_siglip_loss_module_accepts_no_bias():
    a, b = features(9, 4), features(9, 4)
    loss = mmfast.nn.SigLipLoss()(a, b, 3.0, None)
    assert abs(loss.item() - oracle.siglip_loss(a, b, 3.0, None).item()) < 1e-5


# ---------------------------------------------------------------- bad input

A, B = features(4, 3), features(4, 3)

BAD = [
    (lambda: mmfast.clip_loss([[1.0]], B, 1.0), TypeError, "image_features must be a torch.Tensor"),
    (lambda: mmfast.clip_loss(A[0], B, 1.0), ValueError, "image_features must be 2-D"),
    (lambda: mmfast.clip_loss(A.double(), B.double(), 1.0), TypeError, "image_features must be float32"),
    (lambda: mmfast.clip_loss(A, B.half(), 1.0), TypeError, "text_features must have the dtype"),
    (lambda: mmfast.clip_loss(A, B.to("meta"), 1.0), ValueError, "text_features must be on the device"),
    (lambda: mmfast.clip_loss(A, features(4, 5), 1.0), ValueError, "text_features must have the feature size D=3"),
    (lambda: mmfast.clip_loss(A, features(5, 3), 1.0), ValueError, "same number of rows"),
    (lambda: mmfast.clip_loss(A[:0], B[:0], 1.0), ValueError, "image_features is an empty batch"),
    (lambda: mmfast.clip_loss(A, B, 0.0), ValueError, "logit_scale must be finite and > 0"),
    (lambda: mmfast.clip_loss(A, B, -2.0), ValueError, "logit_scale must be finite and > 0"),
    (lambda: mmfast.clip_loss(A, B, float("inf")), ValueError, "logit_scale must be finite and > 0"),
    (lambda: mmfast.clip_loss(A, B, torch.tensor(float("nan"))), ValueError, "logit_scale must be finite"),
    (lambda: mmfast.clip_loss(A, B, torch.ones(2)), ValueError, r"logit_scale must have shape \[\] or \[1\]"),
    (lambda: mmfast.clip_loss(A, B, "2"), TypeError, "logit_scale must be a float"),
    (lambda: mmfast.clip_loss(A, B, 1.0, logit_bias=float("nan")), ValueError, "logit_bias must be finite"),
    (lambda: mmfast.clip_loss(A, B, 1.0, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: mmfast.clip_loss(A, B, 1.0, label_smoothing=1.0), ValueError, "label_smoothing must be a float in"),
    (lambda: mmfast.clip_loss(A, B, 1.0, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: mmfast.infonce_loss(features(5, 3), B, 1.0), ValueError, "labels default to arange"),
    (lambda: mmfast.infonce_loss(A, B, 1.0, labels=torch.tensor([0, 1, 2, 4])), ValueError, r"labels must index keys, in \[0, 4\)"),
    (lambda: mmfast.infonce_loss(A, B, 1.0, labels=torch.tensor([0, -1, 2, 3])), ValueError, "labels must index keys"),
    (lambda: mmfast.infonce_loss(A, B, 1.0, labels=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError, "labels must be int64"),
    (lambda: mmfast.infonce_loss(A, B, 1.0, labels=torch.tensor([0, 1])), ValueError, r"labels must have shape \(4,\)"),
    (lambda: mmfast.infonce_loss(A, B, 1.0, negatives=features(3, 2)), ValueError, "negatives must have the feature size"),
    (lambda: mmfast.infonce_loss(A, B[:0], 1.0), ValueError, "keys is an empty batch"),
    (lambda: mmfast.siglip_loss(A, B[:2], 1.0, 0.0), ValueError, "text_features needs at least as many rows"),
    (lambda: mmfast.siglip_loss(A, B, 1.0, "x"), TypeError, "logit_bias must be a float"),
    (lambda: mmfast.clip_loss(A, B, True), TypeError, "logit_scale must be a float"),
    (lambda: mmfast.clip_loss(A, B, 10**400), ValueError, "logit_scale must be finite"),
    (lambda: mmfast.clip_loss(A[:, :0], B[:, :0], 1.0), ValueError, r"image_features has no features \(D = 0\)"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_backend_asked_by_name_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: "):
        mmfast.clip_loss(A, B, 1.0, backend="triton")


def test_backend_selection(monkeypatch):
    from mmfast import _backends

    cpu = torch.device("cpu")
    expected = "cpu" if _backends.EXT_ERROR is None else "torch"
    assert _backends.select(None, cpu) == expected
    monkeypatch.setenv("MMFAST_BACKEND", "reference")
    assert _backends.select(None, cpu) == "reference"
    monkeypatch.setenv("MMFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.select(None, cpu)


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "mmfast", "info"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "reference", "cpu", "triton", "default"):
        assert word in out


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = r"""
n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
s = torch.tensor(20.0, requires_grad=True)

def warm():  # code paths, lazy imports
    mmfast.clip_loss(a[:64], b[:64], s, backend=backend).backward()
    a.grad = b.grad = s.grad = None

def step():
    mmfast.clip_loss(a, b, s, backend=backend).backward()
"""


def peak_growth(backend, n=8192, d=64):
    """Peak memory of one forward+backward beyond what existed before it, in a fresh process."""
    return peak_growth_in_subprocess(MEMORY_SCRIPT, n, d, backend)


NXN_BYTES = 8192 * 8192 * 4  # one N×N fp32 buffer: 256 MB


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])  # triton: the gpu tier
def test_no_nxn_buffer(backend):
    # cpu: ~9 MB (tile buffers, dB partials); torch: ~33 MB (a few 4 MB chunks of logits).
    assert peak_growth(backend) < NXN_BYTES / 4


@pytest.mark.slow
def test_memory_measure_sees_an_nxn_buffer():
    """The measurement above can fail: the reference backend, which holds the logits, is caught."""
    assert peak_growth("reference") > NXN_BYTES


CAPABILITY_SCRIPT = r"""
import sys, torch, mmfast
from tests import oracle
from tests.helpers import features, loss_and_grads, rel_err
print(torch.ops.mmfast.cpu_capability())
a, b = features(300, 37), features(300, 37)
for fn, ref, args in [(mmfast.clip_loss, oracle.clip_loss, [a, b, torch.tensor(30.0)]),
                      (mmfast.siglip_loss, oracle.siglip_loss, [a, b, torch.tensor(10.0), torch.tensor(-10.0)])]:
    out = loss_and_grads(lambda *t: fn(*t, backend="cpu"), args)
    exp = loss_and_grads(ref, [t.double() for t in args])
    print(max(rel_err(o, e) for o, e in zip(out, exp)))
"""


@pytest.mark.skipif("cpu" not in FUSED, reason="mmfast._C is not built")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_kernel_builds_for_each_instruction_set(capability):
    """The tile kernels are compiled per instruction set; ATEN_CPU_CAPABILITY selects a narrower one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.split()
    if platform.machine() in ("x86_64", "AMD64"):
        assert lines[0] == capability
    assert all(float(err) < FP32_TOL for err in lines[1:]), out.stdout
