#!/usr/bin/env bash
# The GPU check: one prepared script for a bare machine with one CUDA GPU, torch and Triton
# preinstalled and no network. It runs the gpu test tier (tests/test_gpu.py, and
# tests/test_triton_hardening.py on the device; cuda beside triton), then benchmarks every op family (bench-*) with
# every backend that runs on CUDA and every installed peer (benchmarks/bench_gpu.py), torch.compile
# last (bench-compiled: its compiles take tens of seconds each).
#
# Time: each step runs under its own timeout, and the timeouts add up to at most 480 s (a device
# call may run 600 s). A benchmark step also stops starting cases when its budget (its timeout
# less 5 s) runs out, and appends each row to the run's JSONL file as soon as it is measured, so a
# step that times out loses only its unfinished case. The last step turns the rows into tables and
# one JSON. Results go to $OUT if set, else benchmarks/results/: gpu-check-STAMP.jsonl (rows),
# gpu-check-STAMP.json (the report) and gpu-tests-STAMP.log.
#
# mmfast runs from the checkout (PYTHONPATH). Its first step builds the cuda backend's library
# (kernels/build.py, nvcc) into mmfast/ for this GPU; the triton backend needs no build; mmfast._C
# (the CPU kernels, bound to the build machine's torch) is not used.
# Peers' wheels (open-clip-torch, inf-cl, liger-kernel, cut-cross-entropy) may lie in .whl/ beside
# the checkout (git-ignored); they are installed into /tmp/mmfast-peers.
#
#   bash benchmarks/gpu_check.sh             # run it
#   bash benchmarks/gpu_check.sh --dry-run   # print the plan (steps, timeouts, total) and exit
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

results="${OUT:-$PWD/benchmarks/results}"
stamp="$(date +%Y%m%d-%H%M%S)"
jsonl="$results/gpu-check-$stamp.jsonl"
export PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/mmfast-peers:$PWD${PYTHONPATH:+:$PYTHONPATH}"

names=() timeouts=() commands=()
step() {  # step NAME TIMEOUT_S COMMAND
  names+=("$1") timeouts+=("$2") commands+=("$3")
}
bench() {  # bench FAMILY TIMEOUT_S: the benchmark stops starting cases 5 s before its timeout
  step "bench-$1" "$2" "python3 benchmarks/bench_gpu.py $1 --budget $(($2 - 5)) --jsonl '$jsonl'"
}

step setup 10 "if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfast-peers .whl/*.whl; fi"
# The cuda backend's library, for this GPU's architecture only (sm_90a on an H200): a minute of nvcc.
step build-cuda 75 "python3 kernels/build.py --out mmfast --archs \"\$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f\"{m}{n}\" + (\"a\" if m == 9 else \"\"))')\" 2>&1 | tail -30"
step machine 15 "python3 -m mmfast info; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; python3 benchmarks/bench_gpu.py machine --jsonl '$jsonl'"
step tests 150 "python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_gpu.py tests/test_triton_hardening.py 2>&1 | tee '$results/gpu-tests-$stamp.log'; exit \${PIPESTATUS[0]}"
bench clip 35
bench siglip 15
bench infonce 25
bench cross_entropy 15
bench linear_cross_entropy 35
bench similarity 10
bench topk 25
bench compiled 30
# The Trainer unchanged on the GPU (bf16 autocast, the default GPU backend's losses): the demo with a 12 s training budget.
step train 20 "python3 -m mmfast demo --minutes 0.2 --no-fused-table --out '$results/demo-gpu-$stamp' 2>&1 | grep -v 'step/s' | tail -20; rm -f '$results/demo-gpu-$stamp/checkpoint.pt'"
step report 15 "python3 benchmarks/bench_gpu.py report --jsonl '$jsonl'"

total=0
for t in "${timeouts[@]}"; do total=$((total + t)); done

if [ "$dry_run" = 1 ]; then
  for i in "${!names[@]}"; do
    printf 'step %-22s timeout %4d s   %s\n' "${names[$i]}" "${timeouts[$i]}" "${commands[$i]}"
  done
  printf 'total %d s (at most 480 s; a device call may run 600 s)\n' "$total"
  exit 0
fi

mkdir -p "$results"
failed=()
start=$SECONDS
for i in "${!names[@]}"; do
  echo "=== ${names[$i]} (timeout ${timeouts[$i]} s, $((SECONDS - start)) s elapsed)"
  t0=$SECONDS
  timeout --kill-after=3 "${timeouts[$i]}" bash -c "${commands[$i]}"
  rc=$?
  echo "=== ${names[$i]}: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== ${names[$i]} timed out: rows measured so far are in $jsonl"
  [ "$rc" = 0 ] || failed+=("${names[$i]}:$rc")
done
echo "gpu check: $((SECONDS - start)) s; results in $results (gpu-check-$stamp.*, gpu-tests-$stamp.log)"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
