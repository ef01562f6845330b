#!/usr/bin/env bash
# Device call 1 (issue 16): the engine in a process of its own against the engine on a
# thread of the server's process, HTTP, both backends, alternated: 1 client x 4 then 32
# clients x 64 requests, 1024 in / 256 out; server steps and ITL.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r1; mkdir -p $R; cp run1.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
date -u | tee -a $R/card.txt
M="--model-path llama-3.1-8b --load-format dummy"
start=$SECONDS
serve() {  # name engine backend
  python3 lab/serve_variant.py --engine $2 -- --port 30123 $M --attention-backend $3 > $R/server-$1.log 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    kill -0 $pid 2>/dev/null || { echo "[$1] server died"; tail -30 $R/server-$1.log; return; }
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
  echo "[$1] ready after $((SECONDS-start)) s: $(grep -m1 -o 'model loaded in [0-9.]* s' $R/server-$1.log)"
  timeout 60 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 1 \
    --num-requests 4 --input-len 1024 --output-len 256 --out $R/bench1-$1.json 2>&1 \
    | grep -E "tok/s|errors" | sed "s/^/[$1 c1] /"
  timeout 90 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 32 \
    --num-requests 64 --input-len 1024 --output-len 256 --out $R/bench32-$1.json 2>&1 \
    | grep -E "ITL|tok/s|errors|server steps" | sed "s/^/[$1 c32] /"
  kill $pid; wait $pid 2>/dev/null
  sleep 2; pgrep -af spawn_main && echo "[$1] engine process left behind"
  echo "elapsed $((SECONDS-start))"
}
serve sage-process process sage_attn
serve sage-thread thread sage_attn
serve sage-process-2 process sage_attn
serve sage-thread-2 thread sage_attn
(( SECONDS - start < 400 )) && serve triton-process process triton
(( SECONDS - start < 480 )) && serve triton-thread thread triton
tar czf $OUT/call1.tgz -C $R .
