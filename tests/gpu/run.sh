#!/usr/bin/env bash
# Run the GPU checks on a device machine (H100): install the carried wheels (.whl, made by
# ../shared/device/wheels.sh), then the gpu-marked tests, the self-check and the layer benchmark.
# Usage (from the repo root, with .whl carried): bash tests/gpu/run.sh [OUT_DIR] [PYTEST_TARGETS...]
#   With PYTEST_TARGETS only those tests run (no self-check, no benchmark).
# A carried .corpus/ (a copy of ~/.cache/falcon_h1) spares the bundled corpus's tokenizer training.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/out}}
shift || true
export OUT
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=/tmp/triton_cache  # shared by every process and run of this call
[ -d .corpus ] && export FALCON_H1_CACHE=$PWD/.corpus
python3 -c "import torch; print('device:', torch.cuda.get_device_name(), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
date -u +"date: %Y-%m-%dT%H:%MZ"
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
