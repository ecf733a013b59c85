"""The CPU benchmarks as a pytest-benchmark suite: op family × implementation × size, timed by
pytest-benchmark in this process (its statistics table, --benchmark-json, --benchmark-compare).

    pytest benchmarks --benchmark-only [--bench-size smoke|small|large] [--bench-no-memory]
        [-k "contrastive and cpu"] [--benchmark-json out.json] [--benchmark-autosave] [--benchmark-compare]

The steps are the bench scripts' own make_step: clip_loss forward + backward (bench_contrastive.py),
the masked-LM loss forward + backward (bench_cross_entropy.py), topk_similarity (bench_similarity.py),
each against its peers and its floor. Each case is one warm-up call, then timed calls (ROUNDS). Its
extra_info holds the sizes, the FLOPs every implementation of the family is credited with, GFLOP/s
from the median time, and the extra peak memory of one call, measured in a fresh process by the
script's worker (as the scripts measure it: a peak in this process would count what earlier cases
left cached). Benchmarks are grouped by family and size. An implementation that cannot run here
(a peer not installed, a backend not built) is skipped with the reason.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import bench_contrastive
import bench_cross_entropy
import bench_similarity
import harness
import peers
from mmfast import _backends


@dataclasses.dataclass(frozen=True)
class Family:
    """A bench script (IMPLS, make_step(impl, *size), flops(*size), and a worker run as
    `--worker MODE IMPL *size REPEATS`), the names of its size's entries, and its sizes by --bench-size."""
    script: object
    size_keys: tuple[str, ...]
    sizes: dict[str, list[tuple[int, ...]]]


FAMILIES = {
    "contrastive": Family(bench_contrastive, ("N", "D"), {
        "smoke": [(128, 64)], "small": [(2048, 512)],
        "large": [(n, bench_contrastive.D) for n in bench_contrastive.SIZES]}),
    "cross_entropy": Family(bench_cross_entropy, ("T", "V", "Dh"), {
        "smoke": [(128, 1000, 64)], "small": [(1024, 30522, 768)],
        "large": list(bench_cross_entropy.SHAPES.values())}),
    "similarity": Family(bench_similarity, ("N", "M", "D", "k"), {
        "smoke": [(128, 4096, 64, 10)], "small": [(1024, 32768, 256, 10)],
        "large": [(bench_similarity.N, bench_similarity.M, bench_similarity.D, bench_similarity.K)]}),
}
ROUNDS = {"smoke": 2, "small": 3, "large": 3}  # timed calls, after one warm-up call
MEMORY_TIMEOUT_S = 1800


def pytest_generate_tests(metafunc):
    """One case per family × implementation × size of --bench-size; ids like contrastive-cpu-N2048-D512."""
    bench_size = metafunc.config.getoption("bench_size")
    cases = [(name, impl, size) for name, family in FAMILIES.items()
             for size in family.sizes[bench_size] for impl in family.script.IMPLS]
    ids = [f"{name}-{impl}-" + "-".join(f"{k}{v}" for k, v in zip(FAMILIES[name].size_keys, size))
           for name, impl, size in cases]
    metafunc.parametrize(("family", "impl", "size"), cases, ids=ids)


def unavailable(impl: str) -> str | None:
    """Why impl cannot run on this machine, or None."""
    if impl == "open_clip" and peers.open_clip_loss() is None:
        return "open-clip-torch is not installed"
    if impl == "torch_chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    backend = impl.removesuffix("_deterministic")
    return _backends.unavailable_reason(backend, torch.device("cpu")) if backend in _backends.BACKENDS else None


def extra_peak(family: Family, impl: str, size: tuple[int, ...]) -> dict:
    """{"extra_peak_mb": growth of the peak RSS over one call} from a fresh worker process, or
    {"memory_error": why it failed}."""
    result = harness.run_worker(family.script.__file__, ["memory", impl, *map(str, size), "1"], MEMORY_TIMEOUT_S)
    if "extra_peak_bytes" in result:
        return {"extra_peak_mb": result["extra_peak_bytes"] / 2**20}
    return {"memory_error": result["error"]}


@pytest.fixture(autouse=True)
def keep_determinism_setting():
    """cpu_deterministic's make_step turns on torch.use_deterministic_algorithms for the process
    (the scripts run it in a worker of its own): set it back after each case."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def test_benchmark(benchmark, request, family, impl, size):
    reason = unavailable(impl)
    if reason:
        pytest.skip(reason)
    spec = FAMILIES[family]
    sizes = dict(zip(spec.size_keys, size))
    flops = spec.script.flops(*size)
    benchmark.group = f"{family} " + " ".join(f"{k}={v}" for k, v in sizes.items())
    benchmark.extra_info.update(sizes, flops=flops)
    if not request.config.getoption("bench_no_memory"):  # first: the worker and this case never hold memory at once
        benchmark.extra_info.update(extra_peak(spec, impl, size))
    step = spec.script.make_step(impl, *size)
    benchmark.pedantic(step, rounds=ROUNDS[request.config.getoption("bench_size")], warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable (one untimed call)
        benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9
