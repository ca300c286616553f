#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: the repository's tests, the template
# plugin's tests, and the conformance kit against the cpu and the template platform.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
.venv/bin/ruff check core platforms plugins_template tests benchmarks
$PY -m pytest -q --pyargs kvplane.testing --kvplane-platform acme -p no:cacheprovider
$PY -m pytest -q --pyargs kvplane.testing --kvplane-platform cpu -p no:cacheprovider
$PY -m pytest -q tests plugins_template/tests
