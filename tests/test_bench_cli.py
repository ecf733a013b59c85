"""`python -m mmfast bench` (mmfast/bench_cli.py) and the pytest-benchmark suite (benchmarks/), end
to end at the smallest cost: the floor of one family at a tiny size (each case still starts fresh
worker processes). What the benchmarks measure is their own business, not these tests'."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmfast import bench_cli
from mmfast.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The results folder of `bench --quick --family similarity --impls matmul --plot`."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))  # run() puts benchmarks/ on the path
        assert main(["bench", "--quick", "--family", "similarity", "--impls", "matmul", "--out", str(out),
                     "--plot"]) == 0
    return out


def the_result(folder: Path) -> Path:
    [result] = folder.glob("similarity-cpu-*.json")
    return result


def test_quick_run_writes_the_json_and_a_plot(quick_run):
    rows = json.loads(the_result(quick_run).read_text())["rows"]
    assert [row["impl"] for row in rows] == ["matmul"]
    assert rows[0]["median_s"] > 0 and rows[0]["extra_peak_mb"] > 0 and rows[0]["M"] == 8192
    if HAVE_MATPLOTLIB:
        assert (quick_run / "bench-similarity-cpu.png").stat().st_size > 10_000


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (an optional extra) is not installed")
def test_from_json_replots_without_running(quick_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["bench", "--from-json", str(the_result(quick_run)), "--plot-dir", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench-similarity-cpu.png"]
    assert (tmp_path / "bench-similarity-cpu.png").stat().st_size > 10_000


def test_without_matplotlib_says_so(quick_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(bench_cli, "have_matplotlib", lambda: False)
    assert main(["bench", "--from-json", str(the_result(quick_run)), "--plot-dir", str(tmp_path)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_errors_that_name_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--family", "contrastiv"])
    assert exc.value.code == 2
    assert re.search(r"--family: invalid choice: 'contrastiv'", capsys.readouterr().err)
    assert main(["bench", "--family", "similarity", "--impls", "open_clip"]) == 2
    assert "--impls: no family chosen has open_clip" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"bench": "ring vs gather", "rows": []}))
    assert main(["bench", "--from-json", str(other)]) == 2
    assert f"--from-json {other}: not a result of benchmarks/bench_*.py" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark is a dev dependency (make setup)")
def test_pytest_benchmark_suite_collects_every_case_and_runs_one(tmp_path, monkeypatch):
    """`pytest benchmarks --benchmark-only`: one smoke case run (timed, its extra_info filled; the
    memory worker left out for time: the quick run above has the scripts' workers measure memory),
    the others collected and deselected."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_contrastive
    import bench_cross_entropy
    import bench_similarity

    cases = sum(len(script.IMPLS) for script in (bench_contrastive, bench_cross_entropy, bench_similarity))
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--bench-size", "smoke",
                           "--bench-no-memory", "-k", "similarity-matmul", "--benchmark-json", str(report), "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(rf"1 passed, {cases - 1} deselected", proc.stdout), proc.stdout[-2000:]
    [bench] = json.loads(report.read_text())["benchmarks"]
    assert bench["name"] == "test_benchmark[similarity-matmul-N128-M4096-D64-k10]"
    assert bench["group"] == "similarity N=128 M=4096 D=64 k=10"
    extra = bench["extra_info"]
    assert extra == {"N": 128, "M": 4096, "D": 64, "k": 10, "flops": 2 * 128 * 4096 * 64, "gflops": extra["gflops"]}
    assert extra["gflops"] > 0
