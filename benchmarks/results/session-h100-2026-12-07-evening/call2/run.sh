#!/usr/bin/env bash
# Device call 2 (issue 16): are the host-bound mixed steps under 32 streaming clients the GIL's?
# HTTP 32 clients (1024 in / 256 out) on sage_attn with the GIL switch interval at 0.5 ms
# (served), 0.1 ms and 0.02 ms, then triton at 0.5 ms; then the engine alone: free-running
# mixed steps' host time (step_latency_probe), both backends.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/r2; mkdir -p $R; cp run2.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
M="--model-path llama-3.1-8b --load-format dummy"
start=$SECONDS
serve() {  # name interval backend
  python3 lab/serve_switch_interval.py $2 --port 30123 $M --attention-backend $3 > $R/server-$1.log 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
  timeout 90 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 32 \
    --num-requests 64 --input-len 1024 --output-len 256 --out $R/bench-$1.json 2>&1 \
    | grep -E "ITL|tok/s|errors|server steps" | sed "s/^/[$1] /"
  kill $pid; wait $pid 2>/dev/null
  echo "elapsed $((SECONDS-start))"
}
serve sage-500us 0.0005 sage_attn
serve sage-100us 0.0001 sage_attn
serve sage-20us 0.00002 sage_attn
serve triton-500us 0.0005 triton
(( SECONDS - start < 330 )) && serve sage-500us-again 0.0005 sage_attn
for b in sage_attn triton; do
  (( SECONDS - start < 450 )) || break
  timeout 120 python3 lab/step_latency_probe.py --backend $b --new-len 1024 --out $R/step-probe-$b.json \
    > $R/step-probe-$b.log 2>&1
  grep "free-running" $R/step-probe-$b.log | cut -c1-160
  echo "elapsed $((SECONDS-start))"
done
