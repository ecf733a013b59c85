"""The gpu tier (pytest -m gpu): every backend that runs on CUDA against the float64 reference at
medium sizes, and the memory bound on the device. Skipped without a CUDA GPU.

The memory bounds come from named formulas (clip_loss_memory, linear_cross_entropy_memory: bytes
by phase of forward + backward, as in docs/architecture.md), which tests/test_triton_hardening.py
also checks against the allocations the same calls make on CPU under the Triton interpreter."""
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

def _cuda_backend(name: str):
    """A backend parameter, skipped with the reason when it cannot run on this GPU (cuda: the library
    is not built; benchmarks/gpu_check.sh builds it first)."""
    from mmfast import _backends

    reason = _backends.unavailable_reason(name, torch.device("cuda")) if torch.cuda.is_available() else "no GPU"
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}"))


CUDA_BACKENDS = [_cuda_backend(name) for name in ("cuda", "triton", "torch", "reference")]
FUSED_BACKENDS = [_cuda_backend(name) for name in ("cuda", "triton")]


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


def cuda_peak_growth(fn, leaves) -> int:
    """Bytes of GPU memory fn() allocates at its peak beyond what was allocated before. A first call
    warms up (autotuning allocates Triton's 256 MB cache-flush buffer), then the leaves' gradients
    are dropped, so the measured call allocates them anew."""
    fn()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak(phases: dict[str, dict[str, int]]) -> int:
    """The largest phase: the sum of what is allocated at once within it."""
    return max(sum(terms.values()) for terms in phases.values())


def vectors(rows: int) -> int:
    """O(rows) tensors alive at once (statistics, their gradients and fp32 copies, per-row losses,
    targets, a sort's scratch): at most 8 of 8 bytes per row."""
    return 64 * rows


def clip_loss_memory(n: int, d: int, itemsize: int, rows: int, splits: int) -> dict[str, dict[str, int]]:
    """Bytes beyond the inputs that clip_loss(a, b, s, backend="triton") and its backward allocate,
    by phase (N = M rows of D features of `itemsize` bytes; rows × splits: the stats grid). The
    composition (mmfast/contrastive/api.py) forms Z_ii = s·Σ_d A_id·B_id from fp32 copies of bf16/fp16
    inputs, which autograd keeps for its backward."""
    m, cast = n, itemsize != 4
    f32 = 4 * (n + m) * d  # A and B (or their gradients) in fp32
    return {
        "forward, stats kernel": {
            "column partials (max fp32, sum fp64), one row per row program": 12 * rows * m,
            "row partials, one row per column split": 12 * splits * n,
            "vectors": vectors(n + m)},
        "forward, composition": {
            "A, B in fp32 (saved for Z_ii's backward)": f32 if cast else 0,
            "A∘B in fp32": 4 * n * d,
            "vectors": vectors(n + m)},
        "backward, composition": {
            "A, B in fp32 (saved)": f32 if cast else 0,
            "gradients of A∘B's two factors, fp32": f32,
            "vectors": vectors(n + m)},
        "backward, grad pass": {
            "the composition's gradients in the input dtype, held for accumulation": itemsize * (n + m) * d,
            "dA, dB fp32 accumulators": f32,
            "dA in the input dtype, while dB's accumulator lives": itemsize * n * d if cast else 0,
            "ds, db: one fp64 pair per row-sweep program (row blocks of 32 or more)": 16 * -(-n // 32),
            "vectors": vectors(n + m)},
    }


def linear_cross_entropy_memory(t: int, v: int, d: int, itemsize: int, splits: int) -> dict[str, dict[str, int]]:
    """Bytes beyond the inputs that linear_cross_entropy(h, w, y, backend="triton") and its backward
    allocate, by phase (T rows of h, V of w, Dh = d, no bias; splits: the forward's vocabulary
    splits). The gradients are accumulated in fp32 and cast to the input dtype at the end, dH first."""
    cast = itemsize != 4
    return {
        "forward": {
            "partials per vocabulary split (max fp32, sum fp64, x_y fp32, Σx fp64)": 24 * splits * t,
            "vectors": vectors(t)},
        "backward, dH cast": {
            "dH fp32": 4 * t * d, "dW fp32": 4 * v * d, "dH in the input dtype": itemsize * t * d if cast else 0,
            "vectors": vectors(t)},
        "backward, dW cast": {
            "dH in the input dtype": itemsize * t * d if cast else 4 * t * d, "dW fp32": 4 * v * d,
            "dW in the input dtype": itemsize * v * d if cast else 0, "vectors": vectors(t)},
    }


def assert_within(extra: int, phases: dict[str, dict[str, int]], forbidden: int, what: str) -> None:
    """extra ≤ the formula's peak (+2% and 4 MiB: the allocator rounds each block to 512 B), and the
    formula itself far below the forbidden buffer's size, so the check still proves it is absent."""
    bound = peak(phases)
    assert bound < forbidden / 2, f"the formula ({bound / 2**20:.0f} MiB) cannot tell a {what} apart"
    detail = {phase: f"{sum(terms.values()) / 2**20:.1f} MiB" for phase, terms in phases.items()}
    assert extra <= 1.02 * bound + 2**22, f"{extra / 2**20:.1f} MiB extra > the formula's {detail}"


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


@pytest.mark.parametrize("backend", [_cuda_backend("cuda")])
def test_cuda_contrastive_memory_has_no_nxn_buffer(backend):
    """The cuda backend's clip_loss forward + backward at N = 32768: far below one N×N bf16 buffer
    (2 GiB); what it does allocate (inputs' gradients, fp32 copies, partials) is O((N + M)·D)."""
    n, d = 32768, 512
    a = features(n, d, torch.bfloat16).cuda().requires_grad_()
    b = features(n, d, torch.bfloat16).cuda().requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    extra = cuda_peak_growth(lambda: mmfast.clip_loss(a, b, s, backend=backend).backward(), [a, b, s])
    assert extra < n * n * 2 / 8, f"{extra / 2**20:.0f} MiB extra"


def test_triton_memory_has_no_nxn_buffer():
    from mmfast.contrastive.triton_kernels import stats_grid

    n, d = 32768, 512
    a = features(n, d, torch.bfloat16).cuda().requires_grad_()
    b = features(n, d, torch.bfloat16).cuda().requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    extra = cuda_peak_growth(lambda: mmfast.clip_loss(a, b, s, backend="triton").backward(), [a, b, s])
    rows, splits, _ = stats_grid(n, n, a.device)
    assert_within(extra, clip_loss_memory(n, d, 2, rows, splits), n * n * 2, "N×N bf16 buffer")


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
    from mmfast.cross_entropy import triton_kernels as ce

    t, v, d = 8192, 30522, 768
    h = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * d ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (t,), device="cuda")
    y[torch.rand(t, device="cuda") >= 0.15] = -100
    extra = cuda_peak_growth(lambda: mmfast.linear_cross_entropy(h, w, y, backend="triton").backward(), [h, w])
    splits = -(-v // ce._LCE_SPLIT_V)
    assert_within(extra, linear_cross_entropy_memory(t, v, d, 2, splits), t * v * 2, "T×V bf16 buffer")


@pytest.mark.parametrize("backend", [_cuda_backend("cuda")])
def test_cuda_linear_cross_entropy_has_no_txv_buffer(backend):
    t, v, d = 8192, 30522, 768
    h = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * d ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (t,), device="cuda")
    y[torch.rand(t, device="cuda") >= 0.15] = -100
    extra = cuda_peak_growth(lambda: mmfast.linear_cross_entropy(h, w, y, backend=backend).backward(), [h, w])
    assert extra < t * v * 2 / 4, f"{extra / 2**20:.0f} MiB extra"  # dW fp32 (94 MiB) + dH: < 1/4 of T×V


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_and_topk_cuda(backend, dtype, normalize):
    """Dense similarity against float64, and top-k exactly as the torch backend on the same scores'
    order (values within the dtype's tolerance, indices equal where the scores are not tied)."""
    q, keys = features(700, 200).cuda().to(dtype), features(5003, 200).cuda().to(dtype)
    s = mmfast.similarity(q, keys, normalize=normalize, backend=backend)
    qd, kd = q.double().cpu(), keys.double().cpu()
    ref = (torch.nn.functional.normalize(qd, dim=1) @ torch.nn.functional.normalize(kd, dim=1).T if normalize
           else qd @ kd.T)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(s.double().cpu(), ref) < (5e-4 if dtype == torch.float32 else tol)
    values, index = mmfast.topk_similarity(q, keys, 37, normalize=normalize, backend=backend)
    exp_values, exp_index = ref.topk(37, dim=1)
    assert rel_err(values.double().cpu(), exp_values) < (5e-4 if dtype == torch.float32 else tol)
    picked = ref.gather(1, index.cpu())  # the scores of the chosen columns are the top scores
    assert rel_err(picked, exp_values) < (5e-4 if dtype == torch.float32 else tol)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic_mode_repeats_bit_for_bit(backend):
    """Under torch.use_deterministic_algorithms(True), two runs give identical bits (the fused
    backends' default mode adds with atomics; their deterministic mode must not)."""
    a, b = (features(3000, 256).cuda().bfloat16().requires_grad_() for _ in range(2))
    h = torch.randn(2000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(5000, 256, device="cuda") / 16).bfloat16().requires_grad_()
    y = torch.randint(0, 5000, (2000,), device="cuda")

    def run():
        out = []
        for loss, leaves in ((lambda: mmfast.clip_loss(a, b, 30.0, backend=backend), (a, b)),
                             (lambda: mmfast.linear_cross_entropy(h, w, y, backend=backend), (h, w))):
            for leaf in leaves:
                leaf.grad = None
            value = loss()
            value.backward()
            out += [value.detach().clone()] + [leaf.grad.clone() for leaf in leaves]
        return out

    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    for x, z in zip(first, second):
        assert torch.equal(x, z)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backends_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) keeps each fused op a single node and gives the eager result."""
    a, b = (features(500, 96).cuda().requires_grad_() for _ in range(2))
    fn = torch.compile(lambda a, b: mmfast.clip_loss(a, b, 20.0, backend=backend), fullgraph=True)
    out, exp = loss_and_grads(fn, [a, b]), loss_and_grads(lambda a, b: mmfast.clip_loss(a, b, 20.0, backend=backend),
                                                           [a, b])
    for o, e in zip(out, exp):
        assert rel_err(o, e) < 1e-6


def test_distributed_ring_on_one_gpu(tmp_path):
    """The ring path on the device (NCCL, one rank: the blocks' walk and the accumulators without a
    neighbour) against the single-device losses, fp32 and bf16."""
    import torch.distributed as dist

    import mmfast.distributed as md

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            a = features(300, 64).to("cuda", dtype)
            b = features(300, 64).to("cuda", dtype)
            scale, bias = torch.tensor(20.0), torch.tensor(-3.0)
            tol = 5e-4 if dtype == torch.float32 else 2e-2
            cases = [(lambda x, y, s, t: md.clip_loss(x, y, s), lambda x, y, s, t: mmfast.clip_loss(x, y, s)),
                     (md.siglip_loss, mmfast.siglip_loss)]
            for ring, single in cases:
                got = loss_and_grads(ring, [a, b, scale.cuda(), bias.cuda()])
                want = loss_and_grads(single, [a, b, scale.cuda(), bias.cuda()])
                for g, w in zip(got, want):
                    assert rel_err(g.float().cpu(), w.float().cpu(), floor=1.0) < tol
    finally:
        dist.destroy_process_group()


# ---- the fused backends on drawn shapes and layouts (the differential fuzzer's GPU side) ----------

LAYOUTS = ("contig", "transposed", "sliced", "strided")
TOL = {torch.float32: 5e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # fp32: TF32 may serve matmuls


def on_gpu(values: torch.Tensor, dtype, layout: str, grad: bool) -> torch.Tensor:
    """values (2-D, float64) as a CUDA tensor of dtype in a layout: column-major, a slice of wider
    rows, or every other row; the padding is NaN, so a kernel that reads past the view shows."""
    n, d = values.shape
    if layout == "transposed":
        t = values.t().contiguous().t()
    elif layout == "sliced":
        t = torch.full((n, d + 5), float("nan"), dtype=torch.float64)[:, :d]
        t.copy_(values)
    elif layout == "strided":
        t = torch.full((2 * n, d), float("nan"), dtype=torch.float64)[::2]
        t.copy_(values)
    else:
        t = values.clone()
    base = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="cuda") if layout == "contig" else None
    if base is None:
        storage = torch.full((t.untyped_storage().nbytes() // 8,), float("nan"), dtype=dtype, device="cuda")
        base = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    base.copy_(t.to(dtype))
    return base.requires_grad_(grad)


def grads_of(loss, inputs):
    wrt = [t for t in inputs if t.requires_grad]
    return list(torch.autograd.grad(loss.sum(), wrt)) if wrt else []


def assert_close(ours, ref, dtype, what):
    for o, r in zip(ours, ref):
        assert rel_err(o.double().cpu(), r.double(), floor=1.0) <= TOL[dtype], what


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("seed", range(16))
def test_drawn_contrastive_cases(backend, seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    op, dtype = pick(["clip", "siglip", "infonce"]), pick([torch.float32, torch.bfloat16, torch.float16])
    n, d = pick([1, 7, 129, 300]), pick([3, 64, 130])
    m = n if op != "infonce" else pick([n, 2 * n + 1])
    grads = [bool(x) for x in torch.randint(2, (3,), generator=g)]
    grads[seed % 3] = True  # at least one input requires grad
    values = [features(n, d, seed=seed).double(), features(m, d, seed=seed + 100).double()]
    a, b = (on_gpu(v, dtype, pick(LAYOUTS), rg) for v, rg in zip(values, grads))
    scale = torch.tensor(pick([1.0, 30.0, 100.0]), device="cuda", requires_grad=grads[2])
    before = [a.detach().clone(), b.detach().clone()]
    labels = torch.randint(0, m, (n,), generator=g)
    calls = {"clip": (lambda a, b, s, be: mmfast.clip_loss(a, b, s, backend=be), oracle.clip_loss),
             "siglip": (lambda a, b, s, be: mmfast.siglip_loss(a, b, s, -5.0, backend=be),
                        lambda a, b, s: oracle.siglip_loss(a, b, s, torch.tensor(-5.0, dtype=torch.float64))),
             "infonce": (lambda a, b, s, be: mmfast.infonce_loss(a, b, s, labels=labels.cuda(), backend=be),
                         lambda a, b, s: oracle.infonce_loss(a, b, s, labels))}
    ours_fn, ref_fn = calls[op]
    loss = ours_fn(a, b, scale, backend)
    ours = [loss] + grads_of(loss, [a, b, scale])
    leaves = [a.detach().double().cpu().requires_grad_(grads[0]), b.detach().double().cpu().requires_grad_(grads[1]),
              scale.detach().double().cpu().requires_grad_(grads[2])]
    ref_loss = ref_fn(*leaves)
    assert_close(ours, [ref_loss] + grads_of(ref_loss, leaves), dtype, f"{op} {dtype} n={n} m={m} d={d}")
    assert all(torch.equal(x.detach(), y) for x, y in zip([a, b], before)), "an input was modified"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_drawn_masked_lm_cases(backend, seed):
    """cross_entropy with −inf masks and ignored rows, linear_cross_entropy with ragged sizes and a
    bias, both on drawn layouts."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    dtype = pick([torch.float32, torch.bfloat16])
    t, v, d = pick([1, 7, 300]), pick([5, 129, 5003]), pick([3, 64, 130])
    y = torch.randint(0, v, (t,), generator=g)
    y[torch.rand(t, generator=g) < 0.3] = -100
    x = torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    x[(torch.rand(t, v, generator=g) < 0.1) & (torch.arange(v) != y.clamp_min(0)[:, None])] = float("-inf")
    xg = on_gpu(x, dtype, pick(LAYOUTS), True)
    before = xg.detach().clone()
    loss = mmfast.cross_entropy(xg, y.cuda(), z_loss=1e-4, backend=backend)
    x64 = xg.detach().double().cpu().requires_grad_()
    ref = oracle.masked_lm_loss(x64, y, z=1e-4)
    assert_close([loss] + grads_of(loss, [xg]), [ref] + grads_of(ref, [x64]), dtype, f"cross_entropy t={t} v={v}")
    assert torch.equal(xg.detach(), before)

    h = on_gpu(torch.randn(t, d, generator=g, dtype=torch.float64), dtype, pick(LAYOUTS), True)
    w = on_gpu(torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5, dtype, pick(LAYOUTS), True)
    bias = torch.randn(v, generator=g).to("cuda", dtype).requires_grad_()
    loss = mmfast.linear_cross_entropy(h, w, y.cuda(), bias=bias, label_smoothing=0.1, backend=backend)
    leaves = [p.detach().double().cpu().requires_grad_() for p in (h, w, bias)]
    ref = oracle.linear_masked_lm_loss(leaves[0], leaves[1], y, leaves[2], eps=0.1)
    assert_close([loss] + grads_of(loss, [h, w, bias]), [ref] + grads_of(ref, leaves), dtype,
                 f"linear_cross_entropy t={t} v={v} d={d}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_drawn_topk_cases(backend, seed):
    """topk_similarity on drawn sizes, k and layouts: the values are the float64 top-k scores, and the
    indices point at scores equal to them (within the dtype's tolerance)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    dtype = pick([torch.float32, torch.bfloat16])
    n, m, d = pick([1, 7, 300]), pick([1, 129, 5003]), pick([3, 64, 130])
    k = int(torch.randint(1, min(m, 100) + 1, (1,), generator=g))
    q = on_gpu(torch.randn(n, d, generator=g, dtype=torch.float64), dtype, pick(LAYOUTS), False)
    keys = on_gpu(torch.randn(m, d, generator=g, dtype=torch.float64), dtype, pick(LAYOUTS), False)
    values, index = mmfast.topk_similarity(q, keys, k, normalize=True, backend=backend)
    qd, kd = (torch.nn.functional.normalize(t.double().cpu(), dim=1) for t in (q, keys))
    scores = qd @ kd.T
    assert index.shape == (n, k) and bool((index.cpu() >= 0).all()) and bool((index.cpu() < m).all())
    assert_close([values, scores.gather(1, index.cpu())], [scores.topk(k, 1).values] * 2, dtype, f"topk k={k}")
    assert bool((values[:, 1:] <= values[:, :-1]).all()), "values are not sorted"
