#!/usr/bin/env bash
# Device call (issue 16): the batch-1 GEMV with programmatic dependent launch, checked
# (its GPU tests, the PDL chain in a CUDA graph, the serving path against the plain eager
# one), then timed end to end: bench offline single stream, GEMV on / off, alternated.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r5; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
start=$SECONDS
timeout 230 python3 -m pytest -x -q -m gpu -p no:cacheprovider --durations=5 \
  tests/test_layers_gemv.py tests/test_layers_fused.py \
  "tests/test_cuda_graph.py::test_overlap_and_fusion_follow_the_plain_eager_path_on_gpu" \
  > $R/gemv-tests.log 2>&1
status=$?
echo "gemv tests rc=$status"; tail -9 $R/gemv-tests.log; echo "elapsed $((SECONDS-start))"
if [[ $status -eq 0 ]]; then
  timeout 320 python3 -m sageserve bench offline --model-path llama-3.1-8b --load-format dummy \
    --backends sage_attn,triton --fused-gemv on,off --batch-sizes 1 --input-lens 512 \
    --output-lens 128 --rounds 2 --out $R/offline-gemv.json > $R/offline-gemv.log 2>&1
  echo "offline rc=$?"; tail -16 $R/offline-gemv.log
fi
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all5.tgz" r5
