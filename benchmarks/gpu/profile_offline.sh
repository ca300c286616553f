#!/bin/bash
# kvplane offline under py-spy on the GPU: where the engine thread's host time goes while
# a workload runs (workload A by default), launching steps included.
# Usage (repository root, kvplane on PYTHONPATH, py-spy on PATH or in PYSPY):
#   bash benchmarks/gpu/profile_offline.sh [extra `kvplane bench throughput` args]
# Writes $OUT/offline.raw.gz (py-spy's collapsed stacks), $OUT/offline.json (the bench's
# figures, slowed by sampling) and prints the summaries of benchmarks/gpu/pyspy_summary.py:
# the whole engine thread, a step's launch, and the eager forward of mixed steps.
set -u
out=${OUT:-.out}
mkdir -p "$out"
${PYSPY:-py-spy} record -r 250 -f raw -o "$out/offline.raw" -- \
    python3 -m kvplane.cli.main bench throughput --dummy qwen3-0.6b --device cuda \
    --max-model-len 4096 --input-len 1024 --output-len 128 --num-prompts 500 \
    --output-json "$out/offline.json" "$@" > "$out/offline.log" 2>&1
tail -3 "$out/offline.log"
summary="python3 benchmarks/gpu/pyspy_summary.py $out/offline.raw --top 20"
echo "== engine loop"; $summary --within "_step_overlapped ("
echo "== launching a step"; $summary --within "launch (model_runner.py"
echo "== eager forward"; $summary --within "_forward (model_runner.py"
gzip -f "$out/offline.raw"
