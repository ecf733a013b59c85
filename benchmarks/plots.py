"""The benchmarks' PNGs (matplotlib is an optional extra: each function imports it, and raises
ImportError without it).

    sweep(payload, family, x, png) a CPU run over sizes (bench_contrastive.py, bench_cross_entropy.py,
                                   bench_similarity.py; `python -m mmfast bench --plot`): median time
                                   and extra peak memory against the size, one line per implementation
    gpu_report(report_json)        a GPU report (bench_gpu.py report): one PNG per family, each case's
                                   implementations as bars of TFLOP/s, the floor as a line
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# The sizes a row may name; those that are the same in every row go into the axis label.
SIZE_KEYS = ("N", "M", "T", "V", "D", "Dh", "k")
# mmfast's backends (CPU names as the CPU benches write them, GPU names as bench_gpu.py does), each
# with its own colour; the fused ones are also the red bars of the GPU report.
MMFAST = {"cpu": "tab:red", "cpu_deterministic": "tab:orange", "torch": "tab:blue",
          "mmfast-cuda": "tab:red", "mmfast-triton": "tab:orange", "mmfast-torch": "tab:blue"}
FUSED = {"cpu", "cpu_deterministic", "mmfast-cuda", "mmfast-triton"}
# The floor: the GEMMs the op must do, timed with torch.mm (bench_similarity.py calls it matmul).
FLOORS = {"floor", "matmul"}
LABELS = {
    "cpu": "mmfast cpu", "cpu_deterministic": "mmfast cpu, deterministic", "torch": "mmfast torch",
    "reference": "mmfast reference (naive)", "open_clip": "open_clip ClipLoss",
    "masked_torch": "torch, kept rows only", "torch_chunked": "torch F.linear_cross_entropy",
    "hf_full": "torch, all rows (HF)", "full_torch": "torch: all scores, then topk",
    "floor": "floor: the GEMMs alone", "matmul": "floor: the matmul alone",
}
OTHER_COLOURS = ("tab:gray", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep(payload: dict, family: str, x: str, png: Path) -> Path:
    """Writes png: the run's median time (s, left) and extra peak memory (MB, right) against the
    size x it sweeps (a row key: N, T, M), log-log, one line per implementation: mmfast's backends
    solid, other implementations dotted, the floor dashed black. Rows with an error are left out."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in payload["rows"] if "median_s" in r]
    fixed = ", ".join(f"{k} = {rows[0][k]}" for k in SIZE_KEYS
                      if k != x and k in rows[0] and len({r.get(k) for r in rows}) == 1)
    sizes = sorted({r[x] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2))
    others = iter(OTHER_COLOURS)
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r[x])
        if impl in FLOORS:  # under the others: a peer's line may lie on it (full_torch's memory)
            style = {"color": "black", "linestyle": "--", "linewidth": 1.5, "zorder": 2}
        elif impl in MMFAST:
            style = {"color": MMFAST[impl], "linestyle": "-", "linewidth": 2.2, "zorder": 4}
        else:
            style = {"color": next(others, "black"), "linestyle": ":", "linewidth": 2.2, "zorder": 3}
        for ax, key in ((left, "median_s"), (right, "extra_peak_mb")):
            points = [(r[x], r[key]) for r in mine if r.get(key, 0) > 0]  # a log axis: no zeros
            if points:
                ax.plot(*zip(*points), marker="o", markersize=4, label=LABELS.get(impl, impl), **style)
    for ax, ylabel in ((left, "median time per step, s (lower is better)"),
                       (right, "extra peak memory, MB (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])  # a tick at each size measured
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 5) else ""))
        ax.set_xlabel(f"{x}  ({fixed})" if fixed else x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)  # below both panels
    machine = payload.get("machine", {})
    fig.suptitle(f"{family}: {payload['bench']}, {payload.get('dtype', '')} on {payload.get('device', '')}\n"
                 f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, "
                 f"{str(machine.get('date', ''))[:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _mantissa(v: float) -> int:
    """The leading digit of v > 0 (the minor ticks of a log axis: 2..9 times a power of ten)."""
    return round(v / 10 ** math.floor(math.log10(v)))


def gpu_report(report_json: Path) -> list[Path]:
    """One PNG per family beside the report: each case's implementations as bars of TFLOP/s (time
    where a row has no FLOP count), fused backends first, the floor as a line."""
    plt = pyplot()
    data = json.loads(Path(report_json).read_text())
    rows = [r for r in data["rows"] if "median_s" in r]
    written = []
    for family in dict.fromkeys(r["family"] for r in rows):
        cases = list(dict.fromkeys(r["sizes"] for r in rows if r["family"] == family))
        fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 3.8), squeeze=False)
        for ax, case in zip(axes[0], cases):
            same = [r for r in rows if r["family"] == family and r["sizes"] == case]
            metric = "tflops" if all("tflops" in r for r in same) else "median_s"
            bars = [r for r in same if r["impl"] not in FLOORS]
            ax.barh([r["impl"] for r in bars], [r[metric] for r in bars],
                    color=["tab:red" if r["impl"] in FUSED else "tab:gray" for r in bars])
            floor = next((r for r in same if r["impl"] in FLOORS), None)
            if floor is not None:
                ax.axvline(floor[metric], color="black", linestyle="--", label="floor (the GEMMs alone)")
                ax.legend(loc="lower right", fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{family}: {case}", fontsize=9)
            ax.set_xlabel("TFLOP/s (higher is better)" if metric == "tflops" else "median seconds (lower is better)")
        fig.suptitle(f"{data['machine'].get('gpu', 'GPU')}, bf16", fontsize=10)
        fig.tight_layout()
        png = Path(report_json).with_name(f"{Path(report_json).stem}-{family}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written
