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
# The large wheels, each only while .whl stays under 60 MiB (a run carries 64 MiB with the working tree); the two
# together (about 41 + 34 MiB) do not fit. bitsandbytes first: the image has none, and without it QLoRA on GPU is
# not checked. Then scipy, which compare's and monitor's statistics import: the image has its own (KINDS.md), which
# serves when this one does not fit; carried, it pins the version tests ran with here (pyproject needs >= 1.15).
carry_if_room() {
  local scratch
  scratch=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$scratch" "$1" || { rm -rf "$scratch"; return 0; }
  local size have
  size=$(du -cm "$scratch"/*.whl | tail -1 | cut -f1)
  have=$(du -sm .whl | cut -f1)
  if [ $((have + size)) -lt 60 ]; then cp "$scratch"/*.whl .whl/; else echo "$1 (${size} MiB) not carried: no room"; fi
  rm -rf "$scratch"
}
carry_if_room bitsandbytes==0.50.2
carry_if_room scipy==1.17.1
du -sh .whl
