#!/bin/bash
# kvplane's server at saturation on the GPU, one server configuration after another: the
# engine's stats line every second, the CPU seconds of the API, engine and client
# processes, the server's /metrics, and (PYSPY=1) py-spy's samples of both server processes.
# Usage (repository root, kvplane and its server wheels on PYTHONPATH, py-spy on PATH):
#   bash benchmarks/gpu/profile_serve.sh MODEL_DIR NUM_PROMPTS "SERVE ARGS" ["SERVE ARGS"...]
# Writes $OUT/profile_serve.tar.gz holding <n>/ for the n-th configuration: serve.log,
# bench_*.json, cpu.txt, metrics.txt, and api.raw / engine.raw (py-spy's collapsed stacks
# with thread names).
set -u
model=$1; num_prompts=$2; shift 2
port=8123

cpu_seconds() {  # utime + stime of a process, in seconds
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0
}

bench() {  # bench NUM_PROMPTS NAME DIR
    python3 -m kvplane.cli.main bench serve --base-url http://127.0.0.1:$port --model "$model" \
        --served-model-name m --dataset random --input-len ${INPUT_LEN:-1024} --output-len ${OUTPUT_LEN:-128} \
        --num-prompts "$1" --request-rate inf --output-json "$3/bench_$2.json" 2>/dev/null \
        | grep -E "output_throughput|mean_ttft|mean_tpot"
}

profile_one() {  # profile_one DIR SERVE_ARGS...
    local dir=$1; shift
    mkdir -p "$dir"
    python3 -m kvplane.cli.main serve "$model" --load-format dummy --device "${DEVICE:-cuda}" \
        --served-model-name m --max-model-len 4096 ${MEMORY_ARGS:---gpu-memory-utilization 0.45} \
        --no-access-log --port $port --log-stats-interval 1 "$@" > "$dir/serve.log" 2>&1 &
    local server=$!
    for _ in $(seq 300); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" \
            2>/dev/null && break
        kill -0 $server 2>/dev/null || { tail -30 "$dir/serve.log"; return 1; }
        sleep 1
    done
    local engine; engine=$(pgrep -P $server -f spawn_main | head -1)
    echo "== $dir: serve $* (server $server, engine ${engine:-none})"
    bench 200 warmup "$dir" > /dev/null
    local api0 engine0; api0=$(cpu_seconds $server); engine0=$(cpu_seconds "${engine:-0}")
    local started; started=$(date +%s.%N)
    bench "$num_prompts" plain "$dir" &
    local client=$! client_cpu=0 spies=()
    if [ "${PYSPY:-0}" = 1 ]; then
        # The client builds its prompts first: sample once the server has work.
        python3 - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
for _ in range(600):
    text = urllib.request.urlopen(url).read().decode()
    if any(line.startswith("kvplane:num_requests_") and not line.endswith(" 0.0")
           for line in text.splitlines()):
        break
    time.sleep(0.1)
PY
        py-spy record -p $server -r 250 -d 10 --threads --idle -f raw -o "$dir/api.raw" \
            --nonblocking > "$dir/pyspy_api.log" 2>&1 & spies+=($!)
        if [ -n "${engine:-}" ]; then
            py-spy record -p "$engine" -r 250 -d 10 --threads --idle -f raw \
                -o "$dir/engine.raw" --nonblocking > "$dir/pyspy_engine.log" 2>&1 & spies+=($!)
        fi
    fi
    # The client's CPU time: sampled while it runs (it is gone once waited for).
    while kill -0 $client 2>/dev/null; do
        local pid; pid=$(pgrep -P $client -f "bench serve" | head -1)
        [ -n "$pid" ] && client_cpu=$(cpu_seconds "$pid")
        sleep 0.5
    done
    wait $client
    local wall; wall=$(awk "BEGIN {print $(date +%s.%N) - $started}")
    echo "wall ${wall} s; cpu s: api $(awk "BEGIN {print $(cpu_seconds $server) - $api0}"),"  \
        "engine $(awk "BEGIN {print $(cpu_seconds "${engine:-0}") - $engine0}"), client >= $client_cpu" \
        | tee "$dir/cpu.txt"
    [ ${#spies[@]} -gt 0 ] && wait "${spies[@]}"
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
        > "$dir/metrics.txt" 2>/dev/null
    grep "kvplane.engine.stats" "$dir/serve.log" | tail -12 | cut -c1-400
    kill $server; wait $server 2>/dev/null
}

index=0
for serve_args in "$@"; do
    # shellcheck disable=SC2086  # one configuration's flags, split on spaces
    profile_one "${OUT:-./.out}/$index" $serve_args
    index=$((index + 1))
done
# One archive: the device hands back only a few files.
(cd "${OUT:-./.out}" && tar czf profile_serve.tar.gz $(seq 0 $((index - 1))) && rm -rf $(seq 0 $((index - 1))))
