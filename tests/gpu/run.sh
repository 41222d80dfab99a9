#!/usr/bin/env bash
# Run the GPU checks on a device machine (H100): install the carried wheels (tests/gpu/env.sh),
# then the gpu-marked tests, the self-check and the layer benchmark.
# Usage (from the repo root, with .whl carried): bash tests/gpu/run.sh [OUT_DIR] [PYTEST_TARGETS...]
#   With PYTEST_TARGETS only those tests run (no self-check, no benchmark).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/out}}
shift || true
export OUT
mkdir -p "$OUT"
source tests/gpu/env.sh || exit 1
if [ $# -gt 0 ]; then
  python3 -m pytest -q -s -m gpu -p no:cacheprovider -o addopts="" "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  exit 0
fi
python3 -m pytest -q -s -m gpu -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
python3 -m falcon_h1.selfcheck 2>&1 | tee "$OUT/selfcheck.log" | tail -20
for sl in 4096 8192; do
  python3 -m falcon_h1.benchmarks.layer --preset 1.5b --micro-batch 2 --seq-len $sl --json "$OUT/layer_1.5b_2x$sl.json" 2>&1 | tee -a "$OUT/layer.log"
done
python3 -m falcon_h1.benchmarks.layer --preset 1.5b --micro-batch 2 --seq-len 4096 --kernel-backend torch --json "$OUT/layer_1.5b_2x4096_torch.json" 2>&1 | tee -a "$OUT/layer.log"
