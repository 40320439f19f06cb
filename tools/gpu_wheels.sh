#!/usr/bin/env bash
# Wheels of what a bare GPU machine lacks for tools/gpu_check.sh, downloaded here (a machine with PyPI access) into
# .whl/ for the GPU machine's Python (default 3.12, x86-64 manylinux): everything this project needs except torch,
# torchvision, numpy, scipy, scikit-image, opencv, pyyaml, tqdm, safetensors, matplotlib, huggingface_hub (and its
# httpx, filelock, ...), requests, regex, pillow and pytest, which such images already hold (check `pip list` there). basicsr 1.4.2 has no wheel on PyPI: it is built here, pure Python.
#
#   bash tools/gpu_wheels.sh [python version, e.g. 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${PLAT[@]}" \
    -d .whl diffusers importlib_metadata mmengine faiss-cpu lmdb einops addict yapf future platformdirs termcolor rich
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl basicsr==1.4.2
ls -la .whl
