"""Builds the CUDA kernels (kernels/*.cu) into libmmfast_cuda.so, and reports what ptxas made of them.

The library is framework-free (a C ABI, loaded by mmfast/_cuda.py with ctypes), so it needs nvcc and
nothing of torch. CMakeLists.txt runs this when nvcc is found; benchmarks/gpu_check.sh runs it on a
GPU machine; tests/test_cuda_compile.py calls ptxas_report for the register/spill check.

    python kernels/build.py --out mmfast                  # the library, for $MMFAST_CUDA_ARCHS
    python kernels/build.py --report --archs "80;90a"     # registers and spills per kernel, as JSON

Architectures: MMFAST_CUDA_ARCHS (default "80;90a"), a list of compute capabilities; each gets a
cubin, and the newest also PTX (without an arch-specific "a" suffix, whose PTX only runs on that
exact architecture), which newer GPUs compile at load time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"
LIBRARY = "libmmfast_cuda.so"
# -O3 without --use_fast_math: the kernels' exp/log must keep full fp32 accuracy (the tests' 1e-5).
COMMON_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{HERE}"]


def sources() -> list[Path]:
    return sorted(HERE.glob("*.cu"))


def parse_archs(archs: str) -> list[str]:
    """"80;90a" → ["80", "90a"] (also accepts commas and spaces); a bad entry is a ValueError naming it."""
    out = [a for a in re.split(r"[;,\s]+", archs.strip()) if a]
    for a in out:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise ValueError(f"MMFAST_CUDA_ARCHS: {a!r} is not a compute capability such as 80 or 90a")
    if not out:
        raise ValueError("MMFAST_CUDA_ARCHS is empty")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """A cubin per architecture, and PTX of the newest (its generic form: 90a → compute_90)."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = max(archs, key=lambda a: int(a.rstrip("a"))).rstrip("a")
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def find_nvcc(nvcc: str | None = None) -> str | None:
    if nvcc:
        return nvcc
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def build_library(out_dir: Path, archs: str = DEFAULT_ARCHS, nvcc: str | None = None, jobs: int = 0) -> Path:
    """Compiles every kernels/*.cu and links them into out_dir/libmmfast_cuda.so (cudart linked
    statically: the library needs only the driver). Raises RuntimeError with nvcc's output on failure."""
    nvcc = find_nvcc(nvcc)
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    arch_list = parse_archs(archs)
    flags = COMMON_FLAGS + gencode_flags(arch_list) + [f'-DMMFAST_CUDA_ARCHS="{";".join(arch_list)}"']
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(src: Path) -> Path:
            obj = Path(tmp) / (src.stem + ".o")
            proc = _run([nvcc, *flags, "-c", str(src), "-o", str(obj)])
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stdout}{proc.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, sources()))
        target = out_dir / LIBRARY
        proc = _run([nvcc, "-shared", "-cudart", "static", *[str(o) for o in objects], "-o", str(target) + ".tmp"])
        if proc.returncode != 0:
            raise RuntimeError(f"linking {LIBRARY} failed:\n{proc.stdout}{proc.stderr}")
        os.replace(str(target) + ".tmp", target)  # atomic: a loaded library is never half-written
    return target


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    filt = Path(nvcc).with_name("cu++filt")
    if not names or not filt.exists():
        return {n: n for n in names}
    proc = subprocess.run([str(filt)], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return dict(zip(names, out)) if proc.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def ptxas_report(source: Path, arch: str, nvcc: str | None = None) -> dict:
    """Compiles `source` to a cubin for sm_`arch` with -Xptxas -v → {"ok", "log", "kernels": [{"name",
    "registers", "stack", "spill_stores", "spill_loads"}]}; ok is False on a compile error."""
    nvcc = find_nvcc(nvcc)
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run([nvcc, *COMMON_FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(source),
                     "-o", str(Path(tmp) / "out.cubin")])
    log = proc.stdout + proc.stderr
    kernels: list[dict] = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append({"name": m.group(1), "arch": m.group(2)})
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif kernels and (m := _REGS.search(line)):
            kernels[-1]["registers"] = int(m.group(1))
    names = _demangle([k["name"] for k in kernels], nvcc)
    for k in kernels:
        k["name"] = names[k["name"]]
    return {"source": source.name, "arch": arch, "ok": proc.returncode == 0, "log": log, "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for libmmfast_cuda.so")
    parser.add_argument("--archs", default=os.environ.get("MMFAST_CUDA_ARCHS") or DEFAULT_ARCHS)
    parser.add_argument("--nvcc", default=None)
    parser.add_argument("--report", action="store_true", help="print ptxas's registers/spills per kernel as JSON")
    args = parser.parse_args(argv)
    if args.report:
        reports = [ptxas_report(src, arch, args.nvcc) for src in sources() for arch in parse_archs(args.archs)]
        for r in reports:
            r.pop("log") if r["ok"] else None
        print(json.dumps(reports, indent=1))
        return 0 if all(r["ok"] for r in reports) else 1
    if args.out is None:
        parser.error("--out or --report is needed")
    try:
        print(f"mmfast: built {build_library(args.out, args.archs, args.nvcc)} for {args.archs}")
    except (RuntimeError, ValueError) as exc:
        print(f"mmfast: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
