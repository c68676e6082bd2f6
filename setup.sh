#!/usr/bin/env bash
# Installs designmodel from this checkout with its test tools.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 *before* the
# package is installed, so that the `torch` requirement is already met and pip never
# downloads several GB of CUDA wheels. Kernels then run in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")"
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
    python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e ".[test]"
