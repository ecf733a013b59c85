"""The gpu tier (pytest -m gpu): every backend that runs on CUDA against the float64 reference at
medium sizes, and the memory bound on the device. Skipped without a CUDA GPU."""
from __future__ import annotations

import pytest
import torch

import mmfast
from tests import oracle
from tests.helpers import features, loss_and_grads, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

CUDA_BACKENDS = ["triton", "torch", "reference"]


def _check(ours, ref, tensors, dtype, eager=None):
    """fp32: 5e-4 relative (TF32 may serve fp32 matmuls on GPU); bf16/fp16: 2× eager's error."""
    cuda = [t.to("cuda") for t in tensors]
    cuda = [t.to(dtype) if t.dim() == 2 else t for t in cuda]
    out = loss_and_grads(ours, cuda)
    exp = loss_and_grads(ref, [t.double().cpu() for t in cuda])
    if dtype == torch.float32:
        tols = [5e-4] * len(out)
    else:
        tols = [2 * rel_err(e.cpu(), r) + 1e-6 for e, r in zip(loss_and_grads(eager, cuda), exp)]
    for o, r, tol in zip(out, exp, tols):
        assert rel_err(o.cpu(), r, floor=1.0) <= tol


def cuda_peak_growth(fn) -> int:
    """Bytes of GPU memory fn() allocates at its peak beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1000, 200), (4097, 512), (777, 1100)])
def test_clip_loss_cuda(backend, dtype, n, d):
    tensors = [features(n, d), features(n, d), torch.tensor(50.0)]
    _check(lambda a, b, s: mmfast.clip_loss(a, b, s, backend=backend), oracle.clip_loss, tensors, dtype,
           oracle.eager_clip_loss)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_infonce_and_siglip_cuda(backend):
    q, k, neg = features(900, 130), features(1300, 130), features(2000, 130)
    labels = torch.randint(0, 1300, (900,), device="cuda")

    def ours(q, k, s, neg):
        return mmfast.infonce_loss(q, k, s, labels=labels, negatives=neg, label_smoothing=0.1, backend=backend)

    def ref(q, k, s, neg):
        return oracle.infonce_loss(q, k, s, labels.cpu(), neg, 0.1)

    _check(ours, ref, [q, k, torch.tensor(20.0), neg], torch.float32)
    a, b = features(1500, 96), features(1500, 96)
    _check(lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend=backend), oracle.siglip_loss,
           [a, b, torch.tensor(10.0), torch.tensor(-10.0)], torch.float32)


def test_triton_memory_has_no_nxn_buffer():
    n, d = 32768, 512
    a = features(n, d, torch.bfloat16).cuda().requires_grad_()
    b = features(n, d, torch.bfloat16).cuda().requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    extra = cuda_peak_growth(lambda: mmfast.clip_loss(a, b, s, backend="triton").backward())
    assert extra < n * n * 2 / 50, f"{extra / 2**20:.0f} MiB extra, an N×N bf16 buffer is {n * n * 2 / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,v,d", [(1000, 5003, 200), (2048, 30522, 768)])
def test_linear_cross_entropy_cuda(backend, dtype, t, v, d):
    y = torch.randint(0, v, (t,))
    y[torch.rand(t) >= 0.15] = -100
    tensors = [features(t, d, normalize=False), features(v, d) * 4, torch.randn(v)]

    def ours(h, w, b):
        return mmfast.linear_cross_entropy(h, w, y.to(h.device), bias=b.to(h.dtype), z_loss=1e-4, backend=backend)

    def eager(h, w, b):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b.to(h.dtype)), y.to(h.device))

    _check(ours, lambda h, w, b: oracle.linear_masked_lm_loss(h, w, y, b, z=1e-4), tensors, dtype, eager)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cross_entropy_cuda(backend):
    x, y = torch.randn(3000, 7001) * 3, torch.randint(0, 7001, (3000,))
    y[::4] = -100
    _check(lambda x: mmfast.cross_entropy(x, y.cuda(), label_smoothing=0.1, backend=backend),
           lambda x: oracle.masked_lm_loss(x, y, eps=0.1), [x], torch.float32)


def test_linear_cross_entropy_compiles_without_host_sync():
    """Row compaction stays on the device: torch.compile(fullgraph=True) traces the whole step."""
    h = torch.randn(512, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (512,), device="cuda")
    y[::3] = -100
    fn = torch.compile(lambda h, w: mmfast.linear_cross_entropy(h, w, y, backend="triton"), fullgraph=True)
    out, exp = loss_and_grads(fn, [h, w]), loss_and_grads(lambda h, w: mmfast.linear_cross_entropy(h, w, y), [h, w])
    for o, e in zip(out, exp):
        assert rel_err(o, e) < 1e-5


def test_triton_linear_cross_entropy_has_no_txv_buffer():
    t, v, d = 8192, 30522, 768
    h = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * d ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (t,), device="cuda")
    y[torch.rand(t, device="cuda") >= 0.15] = -100
    extra = cuda_peak_growth(lambda: mmfast.linear_cross_entropy(h, w, y, backend="triton").backward())
    # The gradients themselves (dW in fp32 while accumulating: 94 MB; dH: 12.6 MB) and O(T) buffers.
    assert extra < t * v * 2 / 4, f"{extra / 2**20:.0f} MiB extra, a T×V bf16 buffer is {t * v * 2 / 2**20:.0f} MiB"
