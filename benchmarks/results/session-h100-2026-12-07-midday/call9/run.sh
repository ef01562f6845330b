#!/usr/bin/env bash
# Device call (issue 16; meant for an H200): the GEMV's GPU tests; single stream with the
# batch-1 GEMV on / off (both backends, 2 rounds alternated); the GEMV launch-setting probe;
# part 8 (64 x 8k decode, both backends; needs > 80 GB).
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r7; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
start=$SECONDS
timeout 100 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_layers_gemv.py > $R/gemv-tests.log 2>&1
status=$?; echo "gemv tests rc=$status"; tail -2 $R/gemv-tests.log
[[ $status -eq 0 ]] || exit 1
timeout 250 python3 -m sageserve bench offline --model-path llama-3.1-8b --load-format dummy \
  --backends sage_attn,triton --fused-gemv on,off --batch-sizes 1 --input-lens 512 \
  --output-lens 128 --rounds 2 --out $R/offline-gemv.json > $R/offline-gemv.log 2>&1
echo "offline rc=$?"; tail -14 $R/offline-gemv.log; echo "elapsed $((SECONDS-start))"
timeout 100 python3 lab/pdl_gemv_probe.py --out $R/pdl-gemv.json > $R/pdl-gemv.log 2>&1
echo "probe rc=$?"; cut -c1-80 $R/pdl-gemv.log; echo "elapsed $((SECONDS-start))"
(( mem > 100000 )) && bash benchmarks/issue16_targets.sh $R/i16 8
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all7.tgz" r7
