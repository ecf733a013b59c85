"""`python -m mmfast bench`: the CPU benchmarks of each op family over a sweep of sizes, as JSON and,
with --plot, one PNG per family.

    python -m mmfast bench [--family contrastive cross_entropy similarity] [--impls NAME ...]
                           [--quick] [--out DIR] [--plot] [--plot-dir DIR]
    python -m mmfast bench --from-json RESULT.json ... [--plot-dir DIR]     re-plot, run nothing

Each family is its script in benchmarks/ (bench_contrastive.py, bench_cross_entropy.py,
bench_similarity.py), run over SWEEPS: every case in fresh processes, time = median of 3 warm
repeats, memory = growth of the peak RSS over one call (benchmarks/harness.py). The scripts print
their tables and write their JSON to --out (default: $OUT, else benchmarks/results/). The sweeps
(about 12 minutes in all on 2 cores; --quick: one tiny size, under a minute per family, most of
it the workers' start-up):
  contrastive    clip_loss fwd+bwd, N = M in 2048, 4096, 8192 at D = 512
  cross_entropy  masked-LM linear + cross-entropy fwd+bwd, T in 1024, 2048, 4096 at BERT's V = 30522,
                 Dh = 768, 15% of the rows kept
  similarity     topk_similarity, k = 10 of M in 16384, 65536, 262144 keys for N = 1024 queries, D = 256
Every implementation of the scripts runs but the deterministic variants (--impls cpu_deterministic
adds them; --impls names the ones to run, in any family that has them). --plot writes
bench-FAMILY-cpu.png to --plot-dir (default: the results folder): median time and extra peak
memory against the size, log-log, one line per implementation, the floor dashed (benchmarks/plots.py).
matplotlib is an optional extra: without it the JSON is still written.

The benchmarks ship with the source checkout (benchmarks/ beside the mmfast package), not with an
installed wheel. Exit codes: 0 done, 1 a family's script failed or the plots could not be drawn,
2 a bad argument (the message names it).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import mmfast


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A family's bench script and the arguments of its sweeps."""
    script: str  # in benchmarks/
    op: str  # the first word of its JSON's "bench": how --from-json knows the family
    size: str  # the row key it sweeps: the plots' x axis
    default: list[str]  # the script's arguments for the sweep
    quick: list[str]  # and for --quick


SWEEPS = {
    "contrastive": Sweep("bench_contrastive.py", "clip_loss", "N",
                         ["--sizes", "2048", "4096", "8192", "--d", "512"],
                         ["--sizes", "256", "--d", "64", "--repeats", "1"]),
    "cross_entropy": Sweep("bench_cross_entropy.py", "linear_cross_entropy", "T",
                           ["--tokens", "1024", "2048", "4096", "--vocab", "30522", "--dh", "768"],
                           ["--tokens", "256", "--vocab", "2000", "--dh", "64", "--repeats", "1"]),
    "similarity": Sweep("bench_similarity.py", "topk_similarity", "M",
                        ["--n", "1024", "--m", "16384", "65536", "262144", "--d", "256", "--k", "10"],
                        ["--n", "256", "--m", "8192", "--d", "64", "--k", "10", "--repeats", "1"]),
}


class BenchError(Exception):
    """A bad argument or a missing piece: the message says which, and the exit code is 2."""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="CPU benchmarks of every op family over a sweep of sizes (JSON, PNG plots)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", choices=list(SWEEPS), default=list(SWEEPS),
                   help="the op families to run (default: all)")
    p.add_argument("--impls", nargs="+", metavar="NAME",
                   help="only these implementations, as the scripts name them (default: all but *_deterministic)")
    p.add_argument("--quick", action="store_true", help="one tiny size, one repeat: a smoke test")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--plot", action="store_true", help="also write a PNG per family (needs matplotlib)")
    p.add_argument("--plot-dir", default=None, help="the PNGs' folder (default: the results folder)")
    p.add_argument("--from-json", nargs="+", metavar="RESULT", default=None,
                   help="plot these results of the bench scripts (one per family) instead of running anything")


def run(args) -> int:
    try:
        bench_dir = benchmarks_dir()
        if str(bench_dir) not in sys.path:  # the bench scripts, as modules, and plots.py
            sys.path.insert(0, str(bench_dir))
        if args.from_json:
            results = {}
            for path, family, payload in map(read_result, args.from_json):
                if family in results:
                    raise BenchError(f"--from-json: {results[family][0]} and {path} are both {family} results; "
                                     f"give one per family (each makes bench-{family}-cpu.png)")
                results[family] = (path, payload)
            return plot_all(results, args.plot_dir)
        impls = chosen_impls(args.family, args.impls)
    except BenchError as exc:
        print(f"python -m mmfast bench: {exc}", file=sys.stderr)
        return 2
    if args.plot and not have_matplotlib():
        print("matplotlib is not installed (an optional extra: pip install matplotlib): "
              "writing the JSON results only", file=sys.stderr)
        args.plot = False
    results = {}
    for family, names in impls.items():
        result = run_family(bench_dir, family, names, args.quick, args.out)
        if result is not None:
            results[family] = result
    plotted = plot_all(results, args.plot_dir) if args.plot and results else 0
    return 1 if len(results) < len(impls) or plotted else 0


def run_family(bench_dir: Path, family: str, impls: list[str], quick: bool, out: str | None):
    """Runs the family's script over its sweep (it prints its table) → (its JSON's path, its
    payload), or None if it failed."""
    sweep = SWEEPS[family]
    print(f"== {family}: benchmarks/{sweep.script} ({', '.join(impls)})", flush=True)
    options = [*(sweep.quick if quick else sweep.default), "--impls", *impls, *(["--out", out] if out else [])]
    proc = subprocess.run([sys.executable, str(bench_dir / sweep.script), *options],
                          stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    written = re.search(r"^written (.+\.json)$", proc.stdout, re.M)
    if proc.returncode != 0 or written is None:
        print(f"{family}: benchmarks/{sweep.script} failed (exit code {proc.returncode})", file=sys.stderr)
        return None
    path = Path(written.group(1))
    return path, json.loads(path.read_text())


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout that holds this mmfast package."""
    path = Path(mmfast.__file__).resolve().parents[1] / "benchmarks"
    if not (path / "harness.py").is_file():
        raise BenchError(f"no benchmarks at {path}: the benchmarks ship with the source checkout (benchmarks/ "
                         "beside the mmfast package), not with an installed wheel; run this command from a clone")
    return path


def chosen_impls(families: list[str], names: list[str] | None) -> dict[str, list[str]]:
    """Each family's implementations to run, in its script's order (families left with none are
    dropped); a name that no chosen family has is an error."""
    available = {family: importlib.import_module(Path(SWEEPS[family].script).stem).IMPLS for family in families}
    if names:
        unknown = sorted(set(names) - {i for impls in available.values() for i in impls})
        if unknown:
            known = "; ".join(f"{family}: {' '.join(impls)}" for family, impls in available.items())
            raise BenchError(f"--impls: no family chosen has {', '.join(unknown)} (known: {known})")
    chosen = {family: [i for i in impls if (i in names if names else not i.endswith("_deterministic"))]
              for family, impls in available.items()}
    return {family: impls for family, impls in chosen.items() if impls}


def read_result(path: str) -> tuple[Path, str, dict]:
    """(path, family, payload) of a bench script's JSON; the family is known by the op it benchmarks."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"--from-json {path}: cannot read a JSON file ({exc})") from None
    op = str(payload.get("bench", "")).split(" ")[0] if isinstance(payload, dict) else ""
    family = next((f for f, sweep in SWEEPS.items() if sweep.op == op), None)
    if family is None or not isinstance(payload.get("rows"), list):
        ops = ", ".join(sweep.op for sweep in SWEEPS.values())
        raise BenchError(f"--from-json {path}: not a result of benchmarks/bench_*.py (expected a \"bench\" of "
                         f"{ops} and \"rows\")")
    return Path(path), family, payload


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_all(results: dict[str, tuple[Path, dict]], plot_dir: str | None) -> int:
    """bench-FAMILY-DEVICE.png per family, in plot_dir (default: beside the family's JSON)."""
    if not have_matplotlib():
        print("matplotlib is not installed (an optional extra: pip install matplotlib): no plots", file=sys.stderr)
        return 1
    import plots

    for family, (path, payload) in results.items():
        if not any("median_s" in row for row in payload["rows"]):
            print(f"{family}: {path} has no timed rows, nothing to plot", file=sys.stderr)
            continue
        png = Path(plot_dir or path.parent) / f"bench-{family}-{payload.get('device', 'cpu')}.png"
        print(f"written {plots.sweep(payload, family, SWEEPS[family].size, png)}")
    return 0
