"""Compile the contrastive Triton kernels for a GPU target without a GPU and report ptxas's
register and spill counts for every autotune config: a check that needs no device.

    python benchmarks/triton_spills.py [--arch 90] [--dtype bf16]

Uses a ptxas bundled with Triton (the PTX it emits can be newer than a system CUDA's ptxas).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmfast.contrastive import triton_kernels as tk

COMMON = {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "pos_ptr": "*i64"}
STATS = {**COMMON, "row_max_ptr": "*fp32", "row_sum_ptr": "*fp64", "col_max_ptr": "*fp32", "col_sum_ptr": "*fp64",
         "N": "i32", "M": "i32", "D": "i32"}
GRAD = {**COMMON, "row_ptr": "*fp64", "col_ptr": "*fp64", "wr_ptr": "*fp32", "wc_ptr": "*fp32", "da_ptr": "*fp32",
        "db_ptr": "*fp32", "sums_ptr": "*fp64", "N": "i32", "M": "i32", "D": "i32"}


def ptxas_report(kernel, signature: dict, constexprs: dict, config, arch: int) -> str:
    constexprs = {**constexprs, **config.kwargs}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    # Triton ships more than one ptxas (e.g. ptxas-blackwell, the newer); the first that takes the PTX.
    candidates = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")),
                        reverse=True)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        for ptxas in candidates:
            proc = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
        out = proc.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if not regs or not spills:
        return "ptxas: " + out.strip().splitlines()[-1]
    return f"{regs.group(1)} registers, spills {spills.group(1)} B stored / {spills.group(2)} B loaded"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    if tk.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's configs are not the GPU's")
    stats_sig = {k: v.format(dt=args.dtype) for k, v in STATS.items()}
    grad_sig = {k: v.format(dt=args.dtype) for k, v in GRAD.items()}
    flags = {"HAS_BIAS": True, "PRECISION": "tf32"}
    for sigmoid in (False, True):
        for config in tk._STATS_CONFIGS:
            constexprs = {**flags, "SIGMOID": sigmoid, "WITH_COLS": not sigmoid, "HAS_POS": sigmoid,
                          "BLOCK_M": tk._STATS_BLOCK_M}
            print(f"stats sigmoid={sigmoid} {config}: {ptxas_report(tk._stats_kernel, stats_sig, constexprs, config, args.arch)}")
        for config in tk._GRAD_CONFIGS:
            constexprs = {**flags, "SIGMOID": sigmoid, "WITH_COLS": not sigmoid, "HAS_POS": sigmoid,
                          "NEED_A": True, "NEED_B": True}
            print(f"grad  sigmoid={sigmoid} {config}: {ptxas_report(tk._grad_kernel, grad_sig, constexprs, config, args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
