#!/usr/bin/env bash
# Download, here, the Python 3.12 wheels that bench/gpu_check.sh installs on a lent GPU machine, whose image
# lacks them (see /work/.library/device/KINDS.md). They land in .whl/ (ignored by git; carried with the run).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  fastapi==0.165.0 annotated-doc==0.0.7 starlette==1.10.0 uvicorn==0.54.0 gguf==0.19.0 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
# bitsandbytes only if it fits the 64 MiB a run may carry (with everything else): else QLoRA on GPU is not checked.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d /tmp/bnb-wheel bitsandbytes==0.50.2 && size=$(du -m /tmp/bnb-wheel/*.whl | cut -f1) && \
  if [ "$size" -lt 50 ]; then cp /tmp/bnb-wheel/*.whl .whl/; else echo "bitsandbytes wheel is ${size} MiB: not carried"; fi
du -sh .whl
