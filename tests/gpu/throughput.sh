#!/usr/bin/env bash
# The throughput measurements on one GPU (docs/performance.md):
#   kernels: the SSD and conv kernels at Falcon-H1 shapes (checked, then timed), the SSD scans at the
#            1.5B and 7B shapes with their per-kernel times (ssd_tiles);
#   step:    the fused weight-gradient GEMMs and the optimizer step (wgrad, optimizer_step), then
#            the 1.5B training step with CUDA graphs against transformers, a same-size Megatron
#            GPT and the component roofline; then without graphs, with a profile of one step;
#   memory:  the longest sequence the 1.5B and 7B train at, with graphs and with whole-layer recompute;
#   decode:  generation with the hybrid cache, 0.5B shape, batch 1, 8 and 32, beside transformers
#            (docs/performance.md; tests/gpu/test_gpu_finetune.py only checks a short decode runs).
# Usage (repo root, .whl carried): bash tests/gpu/throughput.sh OUT_DIR [kernels|step|memory|decode|all]
set -uo pipefail
OUT=${1:-/tmp/out}; WHAT=${2:-all}
mkdir -p "$OUT"
source tests/gpu/env.sh || exit 1
trap 'save_triton_cache "$OUT"' EXIT  # the autotune choices, for the next machine's .triton_cache
if [ "$WHAT" = kernels ] || [ "$WHAT" = all ]; then
  python3 -m falcon_h1.benchmarks.kernels --presets 0.5b 1.5b 7b 34b --seq-lengths 4096 8192 \
    --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -45 "$OUT/kernels.log"
  python3 -m falcon_h1.benchmarks.ssd_tiles --presets 1.5b 7b --seq-length 8192 --tiles '[{}]' \
    --json "$OUT/ssd_tiles.json" 2>&1 | grep -v "^  "
fi
if [ "$WHAT" = step ] || [ "$WHAT" = all ]; then
  python3 -m falcon_h1.benchmarks.wgrad --preset 1.5b --tokens 8192 --json "$OUT/wgrad_1.5b.json" 2>&1 | tail -9
  python3 -m falcon_h1.benchmarks.optimizer_step --preset 1.5b --json "$OUT/optimizer_step.json" 2>&1 | tail -12
  python3 -m falcon_h1.benchmarks.step --preset 1.5b --seq-lengths 4096 8192 --cuda-graphs \
    --json "$OUT/step_1.5b_graphs.json" > "$OUT/step_graphs.log" 2>&1; grep -a "bench row" "$OUT/step_graphs.log"
  python3 -m falcon_h1.benchmarks.step --preset 1.5b --seq-lengths 4096 8192 --no-compare --profile \
    --json "$OUT/step_1.5b_eager.json" > "$OUT/step_eager.log" 2>&1; tail -25 "$OUT/step_eager.log"
fi
if [ "$WHAT" = memory ] || [ "$WHAT" = all ]; then
  # 2026-11-28, H100: 1.5B at 32768 ran out of memory with graphs, and with core_attn + ssd_scan
  # recompute; with whole-layer recompute (only each layer's input kept) it trained at 32768 and
  # 65536 (33.8 and 41.3 GiB).
  python3 -m falcon_h1.benchmarks.max_length --preset 1.5b --start 16384 --max 65536 --cuda-graphs \
    --json "$OUT/max_length_1.5b_graphs.json" 2>&1 | grep "tokens:\|largest"
  python3 -m falcon_h1.benchmarks.max_length --preset 1.5b --recompute full --start 32768 --max 131072 \
    --json "$OUT/max_length_1.5b_full_recompute.json" 2>&1 | grep "tokens:\|largest"
  python3 -m falcon_h1.benchmarks.max_length --preset 7b --recompute full --start 16384 --max 65536 \
    --json "$OUT/max_length_7b_full_recompute.json" 2>&1 | grep "tokens:\|largest"
fi
if [ "$WHAT" = decode ] || [ "$WHAT" = all ]; then
  python3 -m falcon_h1.benchmarks.decode --preset 0.5b --batch-sizes 1 8 32 --prompt-len 512 --new-tokens 128 \
    --repeats 2 --hf --json "$OUT/decode_0p5b.json" > "$OUT/decode.log" 2>&1; grep -a "batch" "$OUT/decode.log"
fi
