#!/usr/bin/env bash
# The GPU check, for a bare machine with one CUDA GPU and torch + Triton preinstalled (no network).
# Installs mmfast (pure Python: the GPU backend is Triton; mmfast._C is the CPU one), runs the gpu
# test tier, then the GPU benchmark; its JSON goes to $OUT if set, else benchmarks/results/.
# Peers' wheels (open-clip-torch, inf-cl, liger-kernel, cut-cross-entropy) may lie in .whl/ beside
# the checkout (git-ignored).
#
#   bash benchmarks/gpu_check.sh [--quick]      # --quick: fewer sizes, for a rerun
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfast-peers .whl/*.whl \
    && export PYTHONPATH="/tmp/mmfast-peers${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! MMFAST_BUILD_EXT=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  echo "pip install failed; using the checkout on PYTHONPATH"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m mmfast info
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

timeout 180 python3 -m pytest -q -ra -m gpu tests/test_gpu.py
tests_rc=$?
timeout 200 python3 benchmarks/bench_gpu.py "${quick[@]}" ${OUT:+--out "$OUT"}
bench_rc=$?
timeout 120 python3 benchmarks/bench_gpu_cross_entropy.py "${quick[@]}" ${OUT:+--out "$OUT"}
mlm_rc=$?
# topk_similarity, bf16, 10^5 queries × 10^6 keys (--quick: 2·10^4 × 2·10^5)
timeout 150 python3 benchmarks/bench_gpu.py --topk "${quick[@]}" ${OUT:+--out "$OUT"}
topk_rc=$?
echo "gpu tests exit $tests_rc, contrastive benchmark exit $bench_rc, masked-LM benchmark exit $mlm_rc," \
     "top-k benchmark exit $topk_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || mlm_rc != 0 || topk_rc != 0 ))
