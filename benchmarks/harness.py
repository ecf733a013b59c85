"""A small benchmark harness: each case runs in fresh processes (one timed, one for memory); the
parent collects medians and ratios and writes one JSON per run.

Times are medians of warm repeats (the machines are shared and noisy: compare ratios within a run).
Extra peak memory is the growth of the process's peak RSS over one call, once the inputs exist
and a tiny call has warmed up the code paths.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmfast._memory import peak_growth  # noqa: F401  (the benchmarks' and tests' memory measure)

RESULTS = Path(__file__).resolve().parent / "results"


def measure(make_step, mode: str, repeats: int) -> dict:
    """In a worker process. make_step(small) builds the case (small=True: a tiny one that warms up
    lazy imports and code paths). mode "memory": growth of the peak RSS over one call of the real
    step; mode "time": one warm-up call, then `repeats` timed calls."""
    make_step(True)()
    step = make_step(False)
    if mode == "memory":
        return {"extra_peak_bytes": peak_growth(step)}
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "median_s": statistics.median(times)}


def run_case(script: str, args: list[str], timeout: float = 1800) -> dict:
    """Times and memory of one case, each from a fresh `script --worker MODE args...` process."""
    return {**run_worker(script, ["time", *args], timeout), **run_worker(script, ["memory", *args], timeout)}


def run_worker(script: str, args: list[str], timeout: float) -> dict:
    """Runs `script --worker args...` in a fresh process; its last stdout line is a JSON dict."""
    env = dict(os.environ)
    if args[0] == "memory":
        # A fixed mmap threshold makes glibc unmap freed blocks at once, so the peak RSS follows
        # what was allocated, not what the allocator kept cached (its dynamic threshold can keep
        # 100s of MB). It would slow the timed runs (every large block page-faults anew): memory only.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in proc.stderr.lower() or proc.returncode == -9
        return {"error": "out of memory" if oom else " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_results(name: str, payload: dict, out_dir: str | None = None) -> Path:
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def report(name: str, payload: dict, columns: list[tuple[str, str, str]], out_dir: str | None = None) -> None:
    """Writes the run's JSON, then prints its rows as a table and where the JSON went."""
    path = write_results(name, payload, out_dir)
    print(table(payload["rows"], columns))
    print(f"\nwritten {path}")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format) — missing values print as '-'."""
    def cell(row, key, fmt):
        v = row.get(key)
        return "-" if v is None else (format(v, fmt) if not isinstance(v, str) else v)

    body = [[h for h, _, _ in columns]] + [[cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def deterministic_backend(impl: str) -> str:
    """The backend an impl name runs: "cpu_deterministic" is the cpu backend with
    torch.use_deterministic_algorithms(True) set (for this worker process, which runs one case)."""
    if impl.endswith("_deterministic"):
        torch.use_deterministic_algorithms(True)
        return impl[: -len("_deterministic")]
    return impl


# ---- GPU timing (benchmarks/bench_gpu*.py) ---------------------------------------------------

def cuda_time(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, by CUDA events (the caller has warmed it up)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def gpu_measure(step, leaves, repeats: int) -> dict:
    """Median CUDA time of step() over `repeats` calls and their peak memory beyond what existed
    before them. One warm-up call first (it autotunes and compiles: Triton's autotuner allocates a
    256 MB cache-flush buffer, which is not the op's memory), then the leaves' gradients are dropped
    and the peak is reset. An exception (out of memory, a peer's failure) is recorded instead, so
    one implementation cannot end the run."""
    try:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        warmup = time.perf_counter() - t0
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = cuda_time(step, repeats)
        result = {"times_s": times, "median_s": statistics.median(times), "warmup_s": warmup,
                  "extra_peak_bytes": torch.cuda.max_memory_allocated() - base}
    except Exception as exc:
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        result = {"error": "out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:300]}"}
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.empty_cache()
    return result


class RowLog:
    """Appends result rows to a JSONL file as each is measured (flushed and synced: a run that is
    killed keeps every finished row)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class Budget:
    """Seconds left of a step's time budget, counted from the process's start."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() - (time.time() - _process_start()) + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _process_start() -> float:
    """The wall-clock time this process started (Linux: /proc/self/stat), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()
