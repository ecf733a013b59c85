"""The wheel a training stack installs (issue 13, part 5), built and used as a user would.

Clones the repository (`git clone` of its root: the committed HEAD, so uncommitted changes are not
in the wheel), builds a wheel there with `python -m build --wheel --no-isolation` and this
interpreter (the dev venv: torch, cmake, ninja, build), and checks it holds mmfast._C, the CUDA
kernels' libmmfast_cuda.so exactly when nvcc is found at build time (PATH, $CUDA_HOME/bin or
/usr/local/cuda/bin, as CMakeLists.txt looks; not with MMFAST_BUILD_CUDA=0), and a torch pin to the
minor version it was built against. Then a fresh venv gets that torch, numpy and the wheel, and with
PATH reduced to the venv's bin/ (no nvcc, cmake, ninja or compiler) and the working directory
outside the repository, runs `python -m mmfast info` and a CPU smoke test of every op family
against plain-torch float64 formulas.

Minutes of building: skipped unless MMFAST_WHEEL_TEST=1 (.ci/run sets it):
    MMFAST_WHEEL_TEST=1 .venv/bin/python -m pytest -q -ra -m wheel tests/test_wheel.py
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.wheel,
    pytest.mark.skipif(os.environ.get("MMFAST_WHEEL_TEST") != "1",
                       reason="builds a wheel and a fresh venv (minutes): set MMFAST_WHEEL_TEST=1, as .ci/run does"),
]

# Runs in the fresh venv. References are plain torch in float64 (design.md §1), independent of
# mmfast's code; the cpu backend runs in fp32 and must be within design.md §4's 1e-5.
SMOKE = r'''
import sys
import torch
import torch.nn.functional as F

import mmfast
from mmfast import _backends

assert mmfast.__file__.startswith(sys.prefix), f"mmfast imported from {mmfast.__file__}, not the venv"
assert _backends.unavailable_reason("cpu") is None, _backends.unavailable_reason("cpu")
torch.manual_seed(0)
TOL = 1e-5


def rel(out, ref):
    return float((out.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def check(name, op, ref, *xs):
    """op on the cpu backend in fp32 against ref in float64: the value and every gradient."""
    x32 = [x.float().requires_grad_() for x in xs]
    x64 = [x.double().requires_grad_() for x in xs]
    out, expected = op(*x32), ref(*x64)
    errs = [rel(out, expected)] + [rel(g, r) for g, r in zip(torch.autograd.grad(out, x32),
                                                              torch.autograd.grad(expected, x64))]
    assert max(errs) < TOL, (name, errs)
    print(f"{name:<21} max rel err {max(errs):.1e}")


def ce(z, t):
    return torch.logsumexp(z, 1) - z.gather(1, t[:, None])[:, 0]


def masked_ce(x, t):
    kept = t != -100
    return ce(x[kept], t[kept]).mean()


a, b = torch.randn(129, 67), torch.randn(129, 67)
diag = torch.arange(129)
check("clip_loss", lambda x, y: mmfast.clip_loss(x, y, 20.0, backend="cpu"),
      lambda x, y: 0.5 * (ce(20 * x @ y.T, diag) + ce(20 * y @ x.T, diag)).mean(), a, b)
sign = 2 * torch.eye(129, dtype=torch.float64) - 1
check("siglip_loss", lambda x, y: mmfast.siglip_loss(x, y, 10.0, -5.0, backend="cpu"),
      lambda x, y: -F.logsigmoid(sign * (10 * x @ y.T - 5)).sum() / 129, a, b)
target = torch.randint(0, 1031, (77,))
target[::3] = -100
check("cross_entropy", lambda x: mmfast.cross_entropy(x, target, backend="cpu"),
      lambda x: masked_ce(x, target), 4 * torch.randn(77, 1031))
check("linear_cross_entropy", lambda h, w: mmfast.linear_cross_entropy(h, w, target, backend="cpu"),
      lambda h, w: masked_ce(h @ w.T, target), torch.randn(77, 48), torch.randn(1031, 48) / 7)
q, keys = torch.randn(33, 67), torch.randn(1000, 67)
values, indices = mmfast.topk_similarity(q, keys, 10, normalize=True, backend="cpu")
expected = torch.topk(F.normalize(q.double(), dim=1) @ F.normalize(keys.double(), dim=1).T, 10)
assert torch.equal(indices, expected.indices), "topk_similarity: indices differ from float64 torch.topk"
assert rel(values, expected.values) < TOL, rel(values, expected.values)
print(f"{'topk_similarity':<21} indices equal, rel err {rel(values, expected.values):.1e}")
print("cpu smoke ok")
'''

# Loads the installed CUDA library as mmfast does (ctypes; no GPU, driver or toolkit needed to load
# it: cudart is linked statically and finds the driver only when a kernel runs).
CUDA_LIBRARY = r'''
import ctypes, pathlib, mmfast
lib = ctypes.CDLL(str(pathlib.Path(mmfast.__file__).with_name("libmmfast_cuda.so")))
lib.mmfast_cuda_archs.restype = ctypes.c_char_p
print(lib.mmfast_cuda_archs().decode())
'''


def nvcc_at_build() -> bool:
    """Whether the build will find nvcc, looking where CMakeLists.txt looks."""
    home = os.environ.get("CUDA_HOME")
    candidates = [Path(home, "bin", "nvcc")] if home else []
    return shutil.which("nvcc") is not None or any(p.exists() for p in candidates + [Path("/usr/local/cuda/bin/nvcc")])


def run(cmd, **kwargs) -> str:
    """Runs cmd and prints how long it took; its output is the failure message when it fails."""
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    print(f"[{time.monotonic() - start:6.1f} s] {' '.join(map(str, cmd))[:120]}")
    return proc.stdout


def test_wheel_from_clean_clone_installs_and_runs_without_build_tools():
    from packaging.requirements import Requirement  # (pytest's own dependency; imported here so that
    from packaging.version import Version            # collecting this file never needs it)

    build_torch = Version(metadata.version("torch"))
    expect_cuda = nvcc_at_build() and os.environ.get("MMFAST_BUILD_CUDA") != "0"
    with tempfile.TemporaryDirectory(prefix="mmfast-wheel-") as tmp:
        tmp = Path(tmp)
        src, dist, venv, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
        work.mkdir()

        # 1. The wheel, from a clean clone, with this interpreter's torch and build tools.
        run(["git", "clone", "-q", str(ROOT), str(src)], timeout=300)
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        env.pop("MMFAST_BUILD_EXT", None)
        run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
            cwd=src, env=env, timeout=1800)
        (wheel,) = dist.glob("mmfast-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        assert any(re.fullmatch(r"mmfast/_C\.[^/]*\.so", n) for n in names), f"no mmfast/_C*.so in {wheel.name}: {names}"
        assert "mmfast/_build_info.py" in names, f"no mmfast/_build_info.py in {wheel.name}"
        assert ("mmfast/libmmfast_cuda.so" in names) == expect_cuda, (
            f"libmmfast_cuda.so {'missing from' if expect_cuda else 'unexpectedly in'} {wheel.name} "
            f"(nvcc found: {nvcc_at_build()}, MMFAST_BUILD_CUDA={os.environ.get('MMFAST_BUILD_CUDA')!r})")
        assert not any(n.startswith(("tests/", "benchmarks/", "kernels/")) for n in names), names

        # The torch pin: the series _C was compiled against, and nothing else.
        (torch_req,) = [Requirement(r) for r in meta.get_all("Requires-Dist") if Requirement(r).name == "torch"]
        major, minor = build_torch.major, build_torch.minor
        for version, ok in [(str(build_torch), True), (f"{major}.{minor}.9", True), (f"{major}.{minor}.0+cu130", True),
                            (f"{major}.{minor + 1}.0", False), (f"{major}.{minor - 1}.0", False)]:
            assert torch_req.specifier.contains(version, prereleases=True) == ok, (str(torch_req), version)

        # 2. A fresh venv: the build's torch (a public release: torch==2.13.0), numpy, then the wheel
        # (pip checks its Requires-Dist against that torch).
        run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        py = venv / "bin" / "python"
        run([str(py), "-m", "pip", "install", "-q", f"torch=={build_torch.public}", "numpy"], timeout=1200)
        run([str(py), "-m", "pip", "install", "-q", str(wheel)], timeout=600)

        # 3. Run it with only the venv on PATH, away from the source tree.
        bare = {"PATH": str(venv / "bin"), "HOME": os.environ.get("HOME", str(tmp)), "TMPDIR": str(tmp),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        for tool in ("nvcc", "cmake", "ninja", "gcc", "c++"):
            assert shutil.which(tool, path=bare["PATH"]) is None, f"{tool} is on the venv's PATH"
        info = run([str(py), "-m", "mmfast", "info"], cwd=work, env=bare, timeout=300)
        print(info)
        assert re.search(r"^\s*cpu\s+available\s*$", info, re.M), info
        assert re.search(r"^default\s+cpu\b", info, re.M), info
        print(run([str(py), "-c", SMOKE], cwd=work, env=bare, timeout=300))
        if expect_cuda:
            archs = run([str(py), "-c", CUDA_LIBRARY], cwd=work, env=bare, timeout=120).strip()
            wanted = re.split(r"[;,\s]+", os.environ.get("MMFAST_CUDA_ARCHS", "80;90a").strip())
            assert re.split(r"[;,\s]+", archs) == wanted, (archs, wanted)
