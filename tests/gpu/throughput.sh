#!/usr/bin/env bash
# The throughput measurements on one GPU (docs/performance.md): the SSD and conv kernels at
# Falcon-H1 shapes (checked, then timed), and the 1.5B training step against transformers, a
# same-size Megatron GPT and the component roofline.
# Usage (repo root, .whl carried): bash tests/gpu/throughput.sh OUT_DIR [kernels|step|all]
set -uo pipefail
OUT=${1:-/tmp/out}; WHAT=${2:-all}
mkdir -p "$OUT"
source tests/gpu/env.sh || exit 1
if [ "$WHAT" = kernels ] || [ "$WHAT" = all ]; then
  python3 -m falcon_h1.benchmarks.kernels --presets 0.5b 1.5b 7b 34b --seq-lengths 4096 8192 \
    --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -45 "$OUT/kernels.log"
fi
if [ "$WHAT" = step ] || [ "$WHAT" = all ]; then
  python3 -m falcon_h1.benchmarks.step --preset 1.5b --seq-lengths 4096 8192 --json "$OUT/step_1.5b.json" \
    > "$OUT/step.log" 2>&1; tail -25 "$OUT/step.log"
fi
