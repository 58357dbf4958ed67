#!/usr/bin/env bash
# Download into .whl/ the wheels a GPU machine without internet needs to run benchmarks/gpu_check.sh: this project's
# packages and those of their needs that such a machine (Python 3.12, PyTorch preinstalled) lacks. Run it from a
# machine with internet access; .whl/ is git-ignored and travels with the working tree (keep it under 64 MiB).
#   benchmarks/fetch_wheels.sh [python version, default 3.12]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="${1:-3.12}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_31_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d .whl \
    nvflare==2.9.0 "monai>=1.6,<1.7" "nibabel>=5.0" "opacus>=1.6,<2" \
    cryptography cffi pycparser pydantic pydantic-core annotated-types typing-inspection pyhocon docker \
    importlib-resources
du -sh .whl
