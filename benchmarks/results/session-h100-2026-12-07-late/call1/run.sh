#!/usr/bin/env bash
# Device call 1 (issue 16): the engine process with its startup heap frozen out of garbage
# collection (served) against the engine on a thread, two rounds alternated, then once with
# --disable-gc-freeze and once under cProfile (lab/engine_profile.py); sage_attn, dummy
# Llama-3.1-8B, 32 clients x 64 requests, 1024 in / 256 out; server steps and gc pauses
# from /metrics; ready times. First the
# direct launches' engine GPU test (H100) or issue 16's 64 x 8k decode (H200).
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r1; mkdir -p $R; cp run1.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
date -u | tee -a $R/card.txt
start=$SECONDS
if grep -q H200 $R/card.txt; then  # issue 16's 64 x 8k ratio needs more than 80 GB
  bash benchmarks/issue16_targets.sh $R/i16 8,11
else
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graph.py -k direct > $R/direct-gpu-test.log 2>&1
  tail -3 $R/direct-gpu-test.log
fi
echo "elapsed $((SECONDS-start))"
M="--model-path llama-3.1-8b --load-format dummy --attention-backend sage_attn"
serve() {  # name engine extra-flags
  local t0=$SECONDS
  python3 lab/serve_variant.py --engine $2 -- --port 30123 $M $3 > $R/server-$1.log 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    kill -0 $pid 2>/dev/null || { echo "[$1] server died"; tail -30 $R/server-$1.log; return; }
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
    sleep 0.5
  done
  echo "[$1] ready after $((SECONDS-t0)) s"
  grep -ho "startup heap frozen, [0-9]* objects[^)]*)" $R/server-$1.log | sed "s/^/[$1] /"
  timeout 90 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 32 \
    --num-requests 64 --input-len 1024 --output-len 256 --out $R/bench32-$1.json 2>&1 \
    | grep -E "ITL|tok/s|errors|server steps|gc pauses" | sed "s/^/[$1 c32] /"
  kill $pid; wait $pid 2>/dev/null
  sleep 2; pgrep -af spawn_main && echo "[$1] engine process left behind"
  echo "elapsed $((SECONDS-start))"
}
for round in 1 2; do
  (( SECONDS - start < 440 )) && serve process-$round process ""
  (( SECONDS - start < 460 )) && serve thread-$round thread ""
done
(( SECONDS - start < 470 )) && serve nofreeze-1 process "--disable-gc-freeze"
if (( SECONDS - start < 480 )); then  # the engine process's steps under cProfile, by kind
  python3 lab/serve_variant.py --engine process --engine-profile $R/profile-sage -- --port 30123 $M > $R/server-profile.log 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
    sleep 0.5
  done
  timeout 90 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 32 \
    --num-requests 64 --input-len 1024 --output-len 256 --out $R/bench32-profile.json 2>&1 \
    | grep -E "server steps" | sed "s/^/[profile c32] /"
  kill $pid; wait $pid 2>/dev/null; sleep 3
  grep -E "^=== |function calls" $R/profile-sage.txt
fi
tar czf $OUT/call1.tgz -C $R .
