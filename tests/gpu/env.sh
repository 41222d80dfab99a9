# Source on a device machine (H100) from the repo root: install the carried wheels (.whl, made by
# ../shared/device/wheels.sh) once into /tmp/site and export what the GPU checks need.
#   source tests/gpu/env.sh && python3 -m pytest -m gpu ...
# A carried .corpus/ (a copy of ~/.cache/falcon_h1) spares the bundled corpus's tokenizer training.
if [ ! -e /tmp/site/.falcon_h1_installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.falcon_h1_installed || return 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Compiled kernels and autotune choices, shared by every process and run of this machine.
export TRITON_CACHE_DIR=/tmp/triton_cache TRITON_CACHE_AUTOTUNING=1
[ -d .corpus ] && export FALCON_H1_CACHE=$PWD/.corpus
# A carried .triton_cache/ (an earlier machine's compiled kernels and autotune choices, saved by
# `save_triton_cache OUT`) spares the minutes that autotuning and compiling the Mamba kernels take
# on a fresh machine.
# It may hold the saved archive itself (triton_autotune.tgz: smaller to carry than what it unpacks to).
if [ -d .triton_cache ]; then
  mkdir -p /tmp/triton_cache && cp -rn .triton_cache/. /tmp/triton_cache/ 2>/dev/null
  [ -f /tmp/triton_cache/triton_autotune.tgz ] && tar xzf /tmp/triton_cache/triton_autotune.tgz -C /tmp/triton_cache \
    && rm /tmp/triton_cache/triton_autotune.tgz
fi
save_triton_cache() {  # the compiled kernels too when they fit the carry limit, else the autotune choices
  (cd /tmp/triton_cache && tar czf "$1/triton_autotune.tgz" . && [ "$(stat -c %s "$1/triton_autotune.tgz")" -lt 15000000 ] \
    || find . -name "*.autotune.json" | tar czf "$1/triton_autotune.tgz" -T -) && ls -la "$1/triton_autotune.tgz"
}
python3 -c "import torch; print('device:', torch.cuda.get_device_name(), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
date -u +"date: %Y-%m-%dT%H:%MZ"
