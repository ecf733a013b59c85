"""Compile mmfast's Triton kernels for a GPU target without a GPU and report ptxas's register
and spill counts for every autotune config: a check that needs no device.

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

from mmfast import _triton
from mmfast.contrastive import triton_kernels as tk
from mmfast.cross_entropy import triton_kernels as ce
from mmfast.similarity import triton_kernels as sim

COMMON = {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "pos_ptr": "*i64"}
STATS = {**COMMON, "row_max_ptr": "*fp32", "row_sum_ptr": "*fp64", "col_max_ptr": "*fp32", "col_sum_ptr": "*fp64",
         "N": "i32", "M": "i32", "D": "i32", "SPLIT": "i32"}
GRAD = {**COMMON, "row_ptr": "*fp64", "col_ptr": "*fp64", "wr_ptr": "*fp32", "wc_ptr": "*fp32", "da_ptr": "*fp32",
        "db_ptr": "*fp32", "sums_ptr": "*fp64", "N": "i32", "M": "i32", "D": "i32"}
CE_FWD = {"x_ptr": "*{dt}", "y_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp64", "V": "i32", "eps": "fp32",
          "z": "fp32"}
CE_GRAD = {"x_ptr": "*{dt}", "y_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*{dt}", "V": "i32", "eps": "fp32",
           "z": "fp32"}
LCE_COMMON = {"h_ptr": "*{dt}", "w_ptr": "*{dt}", "b_ptr": "*{dt}", "y_ptr": "*i64", "order_ptr": "*i64",
              "kept_ptr": "*i64"}
LCE_FWD = {**LCE_COMMON, "mx_ptr": "*fp32", "sum_ptr": "*fp64", "xy_ptr": "*fp32", "xsum_ptr": "*fp64", "T": "i32",
           "V": "i32", "D": "i32", "SPLIT_V": "i32"}
MERGE = {"max_ptr": "*fp32", "sum_ptr": "*fp64", "out_ptr": "*fp64", "PARTS": "i32", "L": "i32"}
SIM = {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32", "out_ptr": "*{dt}",
       "N": "i32", "M": "i32", "D": "i32"}
TOPK = {"q_ptr": "*{dt}", "k_ptr": "*{dt}", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32", "key_out_ptr": "*i32",
        "col_out_ptr": "*i32", "N": "i32", "M": "i32", "D": "i32", "seg_cols": "i32"}
LCE_BWD = {**LCE_COMMON, "lse_ptr": "*fp64", "rw_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
           "V": "i32", "D": "i32", "eps": "fp32", "z": "fp32"}


def ptxas_report(kernel, signature: dict, constexprs: dict, config, arch: int) -> str:
    constexprs = {**constexprs, **config.kwargs}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    jit_fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the JITFunction
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
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
    def sig(template):
        return {k: v.format(dt=args.dtype) for k, v in template.items()}

    flags = {"HAS_BIAS": True, "PRECISION": "tf32"}
    for sigmoid in (False, True):
        for config in tk._STATS_CONFIGS:
            constexprs = {**flags, "SIGMOID": sigmoid, "WITH_COLS": not sigmoid, "HAS_POS": sigmoid,
                          "BLOCK_M": tk._STATS_BLOCK_M}
            print(f"stats sigmoid={sigmoid} {config}: {ptxas_report(tk._stats_kernel, sig(STATS), constexprs, config, args.arch)}")
        for columns in (False, True):  # the row sweep (dB by atomics), the deterministic column sweep
            for config in tk._GRAD_CONFIGS:
                constexprs = {**flags, "SIGMOID": sigmoid, "WITH_COLS": not sigmoid, "HAS_POS": sigmoid,
                              "NEED_A": not columns, "NEED_B": True, "COLUMNS": columns}
                report = ptxas_report(tk._grad_kernel, sig(GRAD), constexprs, config, args.arch)
                print(f"grad  sigmoid={sigmoid} columns={columns} {config}: {report}")
    merge_config = triton.Config({"BLOCK": _triton._MERGE_BLOCK})
    print(f"lse merge {merge_config}: {ptxas_report(_triton._lse_merge_kernel, MERGE, {}, merge_config, args.arch)}")
    rows = dict(ce._ROW_LAUNCH)
    row_config = triton.Config({"BLOCK_V": rows.pop("BLOCK_V")}, **rows)
    print(f"cross_entropy fwd {row_config}: {ptxas_report(ce._ce_fwd_kernel, sig(CE_FWD), {}, row_config, args.arch)}")
    print(f"cross_entropy grad {row_config}: {ptxas_report(ce._ce_grad_kernel, sig(CE_GRAD), {}, row_config, args.arch)}")
    fwd = dict(ce._LCE_FWD_CONFIG)
    tiles = {k: fwd.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    fwd_config = triton.Config(tiles, **fwd)
    print(f"linear_cross_entropy fwd {fwd_config}: {ptxas_report(ce._lce_fwd_kernel, sig(LCE_FWD), flags, fwd_config, args.arch)}")
    for config in ce._LCE_BWD_CONFIGS:
        print(f"linear_cross_entropy bwd {config}: {ptxas_report(ce._lce_bwd_kernel, sig(LCE_BWD), flags, config, args.arch)}")
    precision = {"PRECISION": "tf32"}
    for config in sim._SIM_CONFIGS:
        print(f"similarity {config}: {ptxas_report(sim._similarity_kernel, sig(SIM), precision, config, args.arch)}")
    for k in (10, 64):  # k = 10 (KP 16) and the largest k the kernel takes (KP 64)
        topk = {**precision, "K": k, "KP": max(16, triton.next_power_of_2(k)), "BLOCK_M": sim._TOPK_BLOCK_M,
                "BLOCK_N": sim._TOPK_BLOCK_N}
        for config in sim._TOPK_CONFIGS:
            print(f"topk k={k} {config}: {ptxas_report(sim._topk_kernel, sig(TOPK), topk, config, args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
