#!/usr/bin/env bash
# The GPU check in one call (tools/gpu_check.py says what it measures). On a lent machine,
# from the repository root, without installing the project:
#   tools/gpu_check.sh                          # results in $OUT/gpu_check.json
#   tools/gpu_check.sh --wheels .whl            # first installs the wheels in .whl (carried):
#                                               # onnxruntime-gpu where the image's is CPU-only
# Anywhere, to test the script on the CPU:
#   tools/gpu_check.sh --dry-run --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$2"/*.whl
    export PYTHONPATH=/tmp/site
    shift 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 tools/gpu_check.py "$@"
