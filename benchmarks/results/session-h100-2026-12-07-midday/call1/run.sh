#!/usr/bin/env bash
# Device call A (carries .whl and .device/gguf_a). H100: the Gluon GPU tests that need no
# GGUF (lazy rescale served), bench kernels at 32 KV heads (balanced order), the PDL GEMV
# probe. H200: decode sweep 64x8k and issue 16 parts 8, 1.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r1; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
start=$SECONDS
if (( mem > 100000 )); then
  timeout 150 python3 lab/decode_config_sweep.py --shapes 64x8192 --repeats 5 \
    --out "$R/decode-sweep.json" > "$R/decode-sweep.log" 2>&1; echo "decode sweep rc $?"
  tail -20 "$R/decode-sweep.log"; echo "elapsed $((SECONDS-start))"
  bash benchmarks/issue16_targets.sh "$R/i16" 8,1
else
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=4 \
    tests/test_gluon_prefill.py -k "not engine_with_the_gluon" > $R/gluon-tests.log 2>&1
  echo "gluon tests rc=$?"; tail -7 $R/gluon-tests.log; echo "elapsed $((SECONDS-start))"
  timeout 230 python3 -m sageserve bench kernels \
    --variants sage_fp16pv_gluon,sage_fp16pv_gluon_norot,sage_fp16pv_norot,sage_fp8pv_gluon,sdpa_cudnn \
    --head-dims 128 --seq-lens 1024,8192,32768 --skip-decode --skip-store \
    --out "$R/kernels-kv32.json" > "$R/kernels-kv32.log" 2>&1
  echo "kernels rc=$?"; tail -22 $R/kernels-kv32.log; echo "elapsed $((SECONDS-start))"
  bash benchmarks/issue16_targets.sh "$R/i16" 10
fi
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all1.tgz" r1
