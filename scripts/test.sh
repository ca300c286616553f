#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: lint and type checks, the repository's
# tests, the template plugin's tests, and the conformance kit against the cpu platform,
# the template platform, the CUDA platform emulated on the CPU (its Triton kernels in
# Triton's interpreter) and the Metal platform emulated on the CPU (its torch path). The
# suite runs on two workers (pytest-xdist, a file per worker at a time, in collection
# order: tests/conftest.py puts the long files first); the tests marked serial (latency
# and load) run alone afterwards. Every process runs torch on one thread (below).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch's default of a thread per core oversubscribes the cores when the two workers (and
# the servers they start) each take every core, and a thread descheduled at an OpenMP
# barrier stalls its whole operation: on two cores, two processes generating at once ran
# about 8x slower with two threads each than with one.
export OMP_NUM_THREADS=1
PY=.venv/bin/python
.venv/bin/ruff check core platforms plugins_template tests benchmarks
.venv/bin/ruff format --check core platforms plugins_template tests benchmarks
.venv/bin/mypy core/src platforms/cpu/src platforms/cuda/src platforms/metal/src \
  plugins_template/src
.venv/bin/mypy --explicit-package-bases benchmarks
$PY -m pytest -q --pyargs kvplane.testing --kvplane-platform acme -p no:cacheprovider
$PY -m pytest -q --pyargs kvplane.testing --kvplane-platform cpu -p no:cacheprovider
$PY -m pytest -q -n 2 --pyargs kvplane.testing --kvplane-platform cuda --kvplane-emulate -p no:cacheprovider
$PY -m pytest -q --pyargs kvplane.testing --kvplane-platform metal --kvplane-emulate -p no:cacheprovider
$PY -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" --durations=25 tests plugins_template/tests
$PY -m pytest -q -m serial --durations=10 tests
