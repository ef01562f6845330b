#!/usr/bin/env bash
# Device call (issue 16, H100): the batch-1 GEMV's launch settings, norm + product pairs in
# CUDA graphs, against cuBLAS (lab/pdl_gemv_probe.py), after its GPU tests.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r8; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
start=$SECONDS
timeout 100 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_layers_gemv.py > $R/gemv-tests.log 2>&1
echo "gemv tests rc=$?"; tail -2 $R/gemv-tests.log
C=4x1024x4,4x2048x4,8x512x4,8x1024x4,8x1024x8,8x2048x4,8x2048x8,16x512x4,16x1024x4,16x1024x8,32x256x4,32x512x8,2x2048x4,2x4096x4
timeout 420 python3 lab/pdl_gemv_probe.py --configs $C --out $R/pdl-gemv-sweep.json > $R/pdl-gemv-sweep.log 2>&1
echo "sweep rc=$?"; cat $R/pdl-gemv-sweep.log | cut -c1-80
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all8.tgz" r8
