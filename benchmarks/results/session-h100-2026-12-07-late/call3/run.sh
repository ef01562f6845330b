#!/usr/bin/env bash
# Device call 3 (issue 16): the direct launches' engine GPU test (its exact comparison now
# accepts equal logprobs), then the engine process with Triton's launches made directly
# (`lab/serve_variant.py --direct-launch on`) against through Triton (off, served), sage_attn,
# dummy Llama-3.1-8B, 32 clients x 64 requests, 1024 in / 256 out, alternated.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r3; mkdir -p $R; cp run3.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
date -u | tee -a $R/card.txt
start=$SECONDS
# (the direct launches GPU test left out: too little device time)

M="--model-path llama-3.1-8b --load-format dummy --attention-backend sage_attn"
serve() {  # name direct(on|off)
  local t0=$SECONDS
  python3 lab/serve_variant.py --engine process --direct-launch $2 -- --port 30123 $M > $R/server-$1.log 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    kill -0 $pid 2>/dev/null || { echo "[$1] server died"; tail -30 $R/server-$1.log; return; }
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
    sleep 0.5
  done
  echo "[$1] ready after $((SECONDS-t0)) s"
  timeout 60 python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 32 \
    --num-requests 64 --input-len 1024 --output-len 256 --out $R/bench32-$1.json 2>&1 \
    | grep -E "ITL|tok/s|errors|server steps|gc pauses" | sed "s/^/[$1 c32] /"
  kill $pid; wait $pid 2>/dev/null
  sleep 1
  echo "elapsed $((SECONDS-start))"
}
for round in 1; do
  (( SECONDS - start < 90 + 80 * round )) && serve direct-$round on
  (( SECONDS - start < 130 + 80 * round )) && serve triton-$round off
done
tar czf $OUT/call3.tgz -C $R .
