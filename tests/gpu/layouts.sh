#!/usr/bin/env bash
# The pretraining recipes' shapes on the 4 GPUs of one host, in the layouts an 8-GPU node would use
# (issue 8: the 8-GPU record, projected from these until an 8-GPU machine is lent).
# Each layout runs the training-step benchmark under torchrun (4 processes, micro-batch 1, 4
# micro-batches per step and DP rank, CUDA graphs; without graphs when the graphed run fails) and
# appends its row to OUT/layouts_<preset>.jsonl. One step is profiled (and left out of the median):
# its row's `profiled_step` gives the communication kernels' time, for the 8-GPU projection:
#   python -m falcon_h1.benchmarks.scale_projection OUT/layouts_1.5b.jsonl --gpus 8
#   python -m falcon_h1.benchmarks.scale_projection OUT/layouts_7b.jsonl --bandwidth-rows OUT/layouts_1.5b.jsonl
# Usage (repo root, .whl carried): bash tests/gpu/layouts.sh OUT_DIR [1.5b|7b|7b_32k|cp128k]
#   cp128k: issue 7's 128k-token sequence of the 1.5B over 4 GPUs with CP=4 (32k tokens per GPU,
#   which needs whole-layer recompute on one H100).
set -uo pipefail
OUT=${1:-/tmp/out}; WHAT=${2:-1.5b}
mkdir -p "$OUT"
source tests/gpu/env.sh || exit 1
trap 'save_triton_cache "$OUT"' EXIT

run_layout() {  # preset seq micro_batches "layout flags" [extra flags]
  local preset=$1 seq=$2 micro=$3 layout=$4 extra=${5:-}
  local row="$OUT/row.json" log="$OUT/layout_${preset}_${seq}_${layout// /_}.log"
  for graphs in --cuda-graphs ""; do
    rm -f "$row"
    # shellcheck disable=SC2086
    timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m falcon_h1.benchmarks.step \
      --preset "$preset" --seq-lengths "$seq" --micro-batches "$micro" --steps 5 --warmup 2 --no-compare --profile \
      $layout $extra $graphs --json "$row" > "$log" 2>&1
    if [ -s "$row" ]; then
      python3 -c "import json,sys; [print(json.dumps(dict(r, cuda_graphs=bool(sys.argv[1])))) for r in json.load(open('$row'))]" \
        "$graphs" >> "$OUT/layouts_${preset}.jsonl"
      grep -a "^| falcon_h1" "$log" | sed "s/^/${graphs:-eager} /"
      return
    fi
    echo "$preset $seq [$layout] $graphs: failed: $(grep -a -m1 -i "error" "$log" | cut -c1-200)"
  done
}

if [ "$WHAT" = 1.5b ]; then
  run_layout 1.5b 8192 4 ""                  # DP=4
  run_layout 1.5b 8192 4 "--tp 2 --sp"       # TP=2 + SP, DP=2
  run_layout 1.5b 8192 4 "--cp 2"            # CP=2, DP=2
  run_layout 1.5b 8192 4 "--pp 2"            # PP=2, DP=2
fi
if [ "$WHAT" = 7b ]; then
  run_layout 7b 8192 4 "--tp 2 --sp"         # the recipe's layout: TP=2 + SP, DP=2
  run_layout 7b 8192 4 "--tp 4 --sp"         # TP=4 + SP
  run_layout 7b 8192 4 "--tp 2 --sp --pp 2"  # TP=2 + SP, PP=2
fi
if [ "$WHAT" = 7b_32k ]; then
  run_layout 7b 32768 2 "--tp 2 --sp --cp 2" "--recompute core_attn ssd_scan"
  run_layout 7b 32768 2 "--tp 2 --sp --cp 2" "--recompute full"
fi
if [ "$WHAT" = cp128k ]; then
  python3 -m falcon_h1.benchmarks.max_length --preset 1.5b --nproc 4 --cp 4 --recompute full --start 131072 \
    --max 131072 --json "$OUT/max_length_1.5b_cp4.json" 2>&1 | grep -a "tokens:\|largest"
fi
