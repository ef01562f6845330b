#!/usr/bin/env bash
# Serving A/B on one GPU: the same server started with each flag set in turn, rounds
# alternated (A, B, A, B), each loaded by `sageserve bench serving`. Results JSON per run.
#
#   bash benchmarks/serving_ab.sh OUT_DIR ROUNDS "BENCH FLAGS" "SERVER FLAGS A" "SERVER FLAGS B" ...
#
# BENCH FLAGS may hold several loads separated by '|' ("--concurrency 1 ... | --concurrency
# 32 ..."): they run in turn against the same server, the first one meeting it just after
# /health answered 200; their results are bench-$i-r$round-$k.json.
#
# FRESH_TRITON_CACHE=1 gives every server an empty Triton kernel cache (TRITON_CACHE_DIR),
# as on a new machine: otherwise a server finds the kernels an earlier one compiled. It
# then also writes kernels-$i-r$round.txt: the kernels compiled before /health answered
# 200 and those compiled while serving (each is a stall of a user's step).
set -u
out=$1; rounds=$2; bench=$3; shift 3
mkdir -p "$out"
port=30123

kernel_names() {  # one line per compiled kernel variant in the server's Triton cache
  find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' -printf '%h %f\n' | sort
}

report_kernels() {
  kernel_names > "$out/.served-kernels"
  {
    echo "compiled before ready: $(wc -l < "$out/.ready-kernels")"
    echo "compiled while serving: $(comm -13 "$out/.ready-kernels" "$out/.served-kernels" | wc -l)"
    comm -13 "$out/.ready-kernels" "$out/.served-kernels" | awk '{print $2}' | sort | uniq -c
    # Each new variant's specialization (divisibility, constants) against the earlier ones.
    comm -13 "$out/.ready-kernels" "$out/.served-kernels" | while read -r dir name; do
      echo "new: $(grep -h -m1 "tt.func" "$dir/${name%.json}.ttir" 2>/dev/null | cut -c1-900)"
      grep " $name\$" "$out/.ready-kernels" | while read -r ready _; do
        echo "before ready: $(grep -h -m1 "tt.func" "$ready/${name%.json}.ttir" | cut -c1-900)"
      done
    done
  } > "$1"
  sed "s/^/[kernels] /" "$1" | cut -c1-300 | head -12
}
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
    if [ "${FRESH_TRITON_CACHE:-0}" = 1 ]; then kernel_names > "$out/.ready-kernels"; fi
    k=0
    IFS='|' read -ra loads <<< "$bench"
    for load in "${loads[@]}"; do
      k=$((k + 1))
      name="bench-$i-r$round"; [ ${#loads[@]} -gt 1 ] && name="$name-$k"
      python3 -m sageserve bench serving --url "http://127.0.0.1:$port" $load \
        --out "$out/$name.json" 2>&1 | grep -E "ITL|TTFT|tok/s|errors|server steps" | sed "s/^/[$i r$round $k] /"
    done
    if [ "${FRESH_TRITON_CACHE:-0}" = 1 ]; then report_kernels "$out/kernels-$i-r$round.txt"; fi
    kill $pid; wait $pid 2>/dev/null
  done
done
