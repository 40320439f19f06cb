#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py) on a bare GPU machine that has torch but not this project's other packages.
#
#   bash tools/gpu_check.sh [gpu_check.py arguments, e.g. --out results/gpu_check]
#
# Packages: if .whl/ holds wheels (made on a machine with internet by `bash tools/gpu_wheels.sh`, for the GPU
# machine's Python), they are installed into /tmp/site first, without dependencies and without touching its torch;
# the project itself is used from this checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
exec python3 tools/gpu_check.py "$@"
