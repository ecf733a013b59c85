"""The CUDA kernels without a GPU: every kernels/*.cu compiles with nvcc for sm_80 and sm_90a, and
ptxas reports no register spills and no local-memory stack frame for any kernel the launchers
instantiate; every launcher mmfast declares (mmfast/*/cuda_kernels.py) is defined in kernels/ with
matching parameters, and exported by the built library. Skipped where nvcc is absent."""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmfast import _cuda

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mmfast_kernels_build", ROOT / "kernels" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
ARCHS = ["80", "90a"]
FAMILIES = ["contrastive", "cross_entropy", "similarity"]


@pytest.fixture(scope="module")
def reports():
    jobs = [(src, arch) for src in build.sources() for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: build.ptxas_report(job[0], job[1], NVCC), jobs))


@needs_nvcc
def test_every_kernel_compiles_for_sm80_and_sm90a(reports):
    failed = [f"{r['source']} sm_{r['arch']}:\n{r['log'][-3000:]}" for r in reports if not r["ok"]]
    assert not failed, "\n".join(failed)
    for family in FAMILIES:
        for arch in ARCHS:
            kernels = [k for r in reports if r["source"] == f"{family}.cu" and r["arch"] == arch for k in r["kernels"]]
            assert kernels, f"kernels/{family}.cu defines no kernel for sm_{arch}"


@needs_nvcc
def test_no_kernel_spills_or_uses_local_memory(reports):
    bad = [f"{r['source']} sm_{r['arch']} {k['name']}: {k.get('registers')} registers, {k['spill_stores']} B spill "
           f"stores, {k['spill_loads']} B spill loads, {k['stack']} B stack"
           for r in reports for k in r["kernels"] if k["spill_stores"] or k["spill_loads"] or k["stack"]]
    assert not bad, "\n".join(bad)


def test_ptxas_report_parser_sees_spills(tmp_path):
    """The spill check can fail: a kernel that indexes a register array at run time is given a stack frame."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "local.cu"
    src.write_text("__global__ void k(float* out, int i) { float a[64];\n"
                   "  for (int j = 0; j < 64; ++j) a[(i + 7 * j) & 63] = out[j] * j;\n"
                   "  for (int j = 0; j < 64; ++j) out[j] = a[(i * j) & 63]; }\n")
    report = build.ptxas_report(src, "80", NVCC)
    assert report["ok"] and report["kernels"] and report["kernels"][0]["stack"] > 0


# ---- launchers: Python declarations against the C definitions ------------------------------------

_C_KINDS = {"PTR": "pointer", "I64": "int64", "I32": "int32", "F32": "float", "F64": "double"}


def _c_kind(param: str) -> str:
    param = re.sub(r"\b(const|__restrict__|restrict)\b", " ", param)
    if "*" in param or "cudaStream_t" in param:
        return "pointer"
    if re.search(r"\b(int64_t|long long)\b", param):
        return "int64"
    if re.search(r"\b(int|int32_t|bool)\b", param):
        return "int32"
    if re.search(r"\bfloat\b", param):
        return "float"
    if re.search(r"\bdouble\b", param):
        return "double"
    return f"unknown: {param.strip()}"


def c_launchers() -> dict[str, list[str]]:
    """name → parameter kinds of every `MMFAST_API int mmfast_…(…)` defined in kernels/*.cu."""
    out = {}
    for src in build.sources():
        for m in re.finditer(r"MMFAST_API\s+int\s+(mmfast_\w+)\s*\(([^)]*)\)\s*\{", src.read_text()):
            params = [p for p in m.group(2).split(",") if p.strip()]
            out[m.group(1)] = [_c_kind(p) for p in params]
    return out


def declared_launchers(family: str) -> dict[str, list[str]]:
    """name → parameter kinds (device and stream first) of every launcher mmfast/<family>/cuda_kernels.py
    declares with mmfast._cuda.function."""
    module = importlib.import_module(f"mmfast.{family}.cuda_kernels")
    kind_names = {kind: name for name, kind in vars(_cuda).items() if name in _C_KINDS}
    return {value.__name__: ["int32", "pointer"] + [_C_KINDS[kind_names[k]] for k in value.kinds]
            for value in vars(module).values() if callable(value) and hasattr(value, "kinds")}


def all_declared() -> dict[str, list[str]]:
    return {name: kinds for family in FAMILIES for name, kinds in declared_launchers(family).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_declared_launcher_matches_its_c_definition(family):
    declared, defined = declared_launchers(family), c_launchers()
    assert declared, f"mmfast/{family}/cuda_kernels.py declares no launcher"
    for name, kinds in declared.items():
        assert name in defined, f"{name} is declared in Python but not defined in kernels/*.cu"
        assert defined[name] == kinds, f"{name}: C parameters {defined[name]}, Python passes {kinds}"


@pytest.mark.skipif(not _cuda.LIBRARY.exists(), reason="libmmfast_cuda.so is not built (no nvcc at build time)")
def test_built_library_exports_every_launcher():
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(_cuda.LIBRARY)], capture_output=True, text=True).stdout
    exported = set(re.findall(r" T (mmfast_\w+)$", symbols, re.M))
    missing = set(all_declared()) - exported
    assert not missing, f"rebuild the library (pip install --no-build-isolation -e .): {sorted(missing)} missing"
    assert {"mmfast_cuda_abi", "mmfast_cuda_probe"} <= exported
    hidden = {s for s in re.findall(r" T (\w+)$", symbols, re.M) if not s.startswith("mmfast_")}
    assert not hidden, f"symbols exported besides the launchers: {sorted(hidden)[:5]}"
