#!/usr/bin/env bash
# The Python packages sbrender needs that the GPU machine's image lacks (it has
# torch, transformers, accelerate, peft, safetensors, huggingface-hub, click,
# pyyaml, pillow, scipy), downloaded here as wheels into .whl/ for its Python
# (3.12, x86-64). The GPU call then carries them:
#   examples/bench/gpu-wheels.sh
#   device run: command "examples/bench/gpu-window.sh", carry [".whl"], timeout_s 600
# gpu-window.sh installs .whl/*.whl into $WORK/site when the folder is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 structlog==26.1.0 watchdog==7.1.0 redis==8.1.0
ls -l .whl
