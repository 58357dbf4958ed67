#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, as one prepared command for a machine with an NVIDIA GPU:
#   benchmarks/gpu_check.sh [flags of python -m benchmarks.gpu_check]
# A machine that lacks this project's Python packages (NVFlare, MONAI, nibabel, Opacus and their needs) gets them
# from wheels in .whl/ at the repository root, fetched beforehand by benchmarks/fetch_wheels.sh on a machine with
# internet access; nothing is downloaded here. It must finish within 10 minutes on an H100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/brats_site .whl/*.whl
    export PYTHONPATH="/tmp/brats_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m benchmarks.gpu_check "$@"
