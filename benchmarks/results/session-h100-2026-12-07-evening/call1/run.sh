#!/usr/bin/env bash
# Device call 1 (issues 16, 18). H200: part 8 (64 x 8k ratio), part 11 (single stream, GEMV
# on/off), the store sweep with the tensor-core rotation, then the 64 x 8k decode sweep.
# H100: the store sweep, then part 3 (HTTP, 32 clients).
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/r1; mkdir -p $R; cp run1.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
start=$SECONDS
sweep() {
  timeout 150 python3 lab/store_config_sweep.py --shapes 16384x32,16384x8 \
    --variants sage_fp16pv,sage_fp16pv_tcrot,sage_fp16pv_norot \
    --configs t64-w8-p1,t64-w8-p2,t64-w4-p2,t128-w8-p1,t32-w8-p2-r128 \
    --out $R/store-sweep.json > $R/store-sweep.log 2>&1
  echo "store sweep rc=$?"; tail -40 $R/store-sweep.log | cut -c1-120; echo "elapsed $((SECONDS-start))"
}
if (( mem > 100000 )); then
  bash benchmarks/issue16_targets.sh $R/i16 8,11
  echo "elapsed $((SECONDS-start))"
  sweep
  (( SECONDS - start < 420 )) && timeout 150 python3 lab/decode_config_sweep.py --shapes 64x8192 --repeats 5 \
    --out $R/decode-sweep.json > $R/decode-sweep.log 2>&1
  echo "decode sweep rc=$?"; tail -30 $R/decode-sweep.log | cut -c1-110
else
  sweep
  (( SECONDS - start < 200 )) && FRESH_TRITON_CACHE=1 bash benchmarks/issue16_targets.sh $R/i16 3
fi
echo "elapsed $((SECONDS-start))"
