#!/usr/bin/env bash
# Device call 5 (issue 16): the GEMV at 1-4 rows (2 rows at the one-row setting, 8 rows back
# to cuBLAS, after call 4's probe). GEMV GPU tests; part 12's bench offline at batches 1-8
# with the GEMV on / off; the tensor-core GEMV of lab/gemv_mma.py at 8 and 4 rows; then
# part 8 and the 64 x 8k decode sweep on an H200, or HTTP (part 3) on an H100. Results are
# written under $OUT as they come, so a cut-off call still returns them.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/r5; mkdir -p $R; cp run5.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
start=$SECONDS
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_layers_gemv.py > $R/gemv-tests.log 2>&1
echo "gemv tests rc=$?"; tail -2 $R/gemv-tests.log
M="--model-path llama-3.1-8b --load-format dummy"
timeout 200 python3 -m sageserve bench offline $M --backends sage_attn \
  --fused-gemv on,off --batch-sizes 1,2,4,8 --input-lens 512 --output-lens 128 --rounds 2 \
  --out "$R/offline-gemv-rows.json" > "$R/offline-gemv-rows.log" 2>&1
tail -16 "$R/offline-gemv-rows.log" | cut -c1-150; echo "elapsed $((SECONDS-start))"
timeout 120 python3 lab/pdl_gemv_probe.py --rows 8,4 --configs 8x1024x4 \
  --mma-configs 16x256x4s4,32x256x4s3,16x512x4s3,16x256x4s6 --out $R/pdl-gemv-mma.json \
  > $R/pdl-gemv-mma.log 2>&1
echo "mma probe rc=$?"; cut -c1-80 $R/pdl-gemv-mma.log; echo "elapsed $((SECONDS-start))"
if (( mem > 100000 )); then
  bash benchmarks/issue16_targets.sh $R/i16 8
  echo "elapsed $((SECONDS-start))"
  (( SECONDS - start < 330 )) && timeout 150 python3 lab/decode_config_sweep.py --shapes 64x8192 --repeats 5 \
    --out $R/decode-sweep.json > $R/decode-sweep.log 2>&1
  echo "sweep rc=$?"; tail -32 $R/decode-sweep.log | cut -c1-110
elif (( SECONDS - start < 150 )); then
  FRESH_TRITON_CACHE=1 bash benchmarks/issue16_targets.sh $R/i16 3
fi
echo "elapsed $((SECONDS-start))"
