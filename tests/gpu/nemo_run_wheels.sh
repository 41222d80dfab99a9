#!/usr/bin/env bash
# Add to .whl/ the wheels that `import nemo_run` (and so the recipes and the falcon-h1 command)
# the checkpoint checksums (xxhash) and tests/gpu/run.sh (pytest-xdist) need beyond the GPU image (which has torch, lightning,
# transformers, rich, typer, jinja2, ...), at the versions of this project's virtual environment. Run from the repo root after
# ../shared/device/wheels.sh.
set -euo pipefail
PY=${PY:-.venv/bin/python}
names=(nemo_run torchx fabric invoke paramiko PyNaCl bcrypt cryptography cffi decorator catalogue omegaconf
       antlr4-python3-runtime toml docstring_parser leptonai loguru fastapi starlette uvicorn pydantic pydantic_core
       annotated-types typing-inspection sniffio python-multipart prometheus-fastapi-instrumentator
       opentelemetry-api opentelemetry-sdk opentelemetry-exporter-prometheus opentelemetry-proto
       opentelemetry-semantic-conventions google-api-core google-auth googleapis-common-protos h2 hpack hyperframe
       importlib_metadata contextlib2 lazy-importer ledoc-ui wcwidth inquirerpy pfzy prompt_toolkit exceptiongroup
       pyasn1 pyasn1-modules rsa cachetools proto-plus deprecated xxhash pytest-xdist execnet)
specs=()
for name in "${names[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  if [ -n "$version" ]; then specs+=("$name==$version"); fi
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 --platform any -d .whl "${specs[@]}"
du -sh .whl
