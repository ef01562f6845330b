#!/usr/bin/env bash
# Device call 4 (issue 16): Triton kernels launched directly (`sageserve.kernel_launch`).
# GPU tests (the launcher, the engine's graphs / overlap / piecewise paths against eager, the
# Gluon prefill in the engine); the mixed steps' host time with direct launches on and off
# (lab/direct_launch_ab.py, both backends); HTTP 32 clients on both backends.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/r4; mkdir -p $R; cp run4.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
M="--model-path llama-3.1-8b --load-format dummy"
start=$SECONDS
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_launch.py \
  tests/test_cuda_graph.py tests/test_piecewise_graph.py tests/test_layers_gemv.py \
  -k "kernel_launch or overlap_and_fusion or engine_with or piecewise_replay or pdl_chain" \
  > $R/gpu-tests.log 2>&1
echo "gpu tests rc=$?"; tail -3 $R/gpu-tests.log; echo "elapsed $((SECONDS-start))"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_sage_decode.py \
  tests/test_kernels_sage_store.py tests/test_kernels_triton_attention.py -x \
  > $R/gpu-kernel-tests.log 2>&1
echo "gpu tests rc=$?"; tail -3 $R/gpu-tests.log; echo "elapsed $((SECONDS-start))"
for b in sage_attn triton; do
  timeout 120 python3 lab/direct_launch_ab.py --backend $b --rounds 4 --out $R/direct-ab-$b.json \
    > $R/direct-ab-$b.log 2>&1
  tail -2 $R/direct-ab-$b.log; echo "elapsed $((SECONDS-start))"
done
serve() {  # name backend
  python3 -m sageserve.launch_server --port 30123 $M --attention-backend $2 > $R/server-$1.log 2>&1 &
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
(( SECONDS - start < 380 )) && serve sage sage_attn
(( SECONDS - start < 450 )) && serve triton triton
(( SECONDS - start < 500 )) && serve sage-again sage_attn
