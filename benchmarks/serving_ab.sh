#!/usr/bin/env bash
# Serving A/B on one GPU: the same server started with each flag set in turn, rounds
# alternated (A, B, A, B), each loaded by `sageserve bench serving`. Results JSON per run.
#
#   bash benchmarks/serving_ab.sh OUT_DIR ROUNDS "BENCH FLAGS" "SERVER FLAGS A" "SERVER FLAGS B" ...
#
# FRESH_TRITON_CACHE=1 gives every server an empty Triton kernel cache (TRITON_CACHE_DIR),
# as on a new machine: otherwise a server finds the kernels an earlier one compiled.
set -u
out=$1; rounds=$2; bench=$3; shift 3
mkdir -p "$out"
port=30123
for round in $(seq 1 "$rounds"); do
  i=0
  for flags in "$@"; do
    i=$((i + 1))
    if [ "${FRESH_TRITON_CACHE:-0}" = 1 ]; then export TRITON_CACHE_DIR=$(mktemp -d); fi
    python3 -m sageserve.launch_server --port $port $flags > "$out/server-$i-r$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do
      kill -0 $pid 2>/dev/null || { echo "server $i died"; tail -20 "$out/server-$i-r$round.log"; break; }
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
      sleep 1
    done
    python3 -m sageserve bench serving --url "http://127.0.0.1:$port" $bench \
      --out "$out/bench-$i-r$round.json" 2>&1 | grep -E "ITL|TTFT|tok/s|errors" | sed "s/^/[$i r$round] /"
    kill $pid; wait $pid 2>/dev/null
  done
done
