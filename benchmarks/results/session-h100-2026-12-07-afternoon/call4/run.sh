#!/usr/bin/env bash
# Device call 4 (issue 16, for an H200; runs on any card): the GEMV of 1-8 rows and the
# PDL trigger of the decode merge/combine. GPU tests (GEMV, serving path against the plain
# eager path, nothing compiled while serving); part 12 (probe at 2/4/8 rows, bench offline
# at batches 1-8, GEMV on/off); part 11 (single stream, both backends); part 8 (64 x 8k,
# both backends, > 80 GB only); part 10 (one-row probe) if time is left.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=/tmp/r4; mkdir -p $R; cp run4.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $R/card.txt
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
start=$SECONDS
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_layers_gemv.py > $R/gemv-tests.log 2>&1
echo "gemv tests rc=$?"; tail -2 $R/gemv-tests.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graph.py \
  -k overlap_and_fusion_follow > $R/serving-path-tests.log 2>&1
echo "serving path rc=$?"; tail -2 $R/serving-path-tests.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_server_route_warmup.py \
  > $R/route-warmup-tests.log 2>&1
echo "route warm-up rc=$?"; tail -2 $R/route-warmup-tests.log; echo "elapsed $((SECONDS-start))"
bash benchmarks/issue16_targets.sh $R/i16 12,11
echo "elapsed $((SECONDS-start))"
(( mem > 100000 )) && bash benchmarks/issue16_targets.sh $R/i16 8
echo "elapsed $((SECONDS-start))"
(( SECONDS - start < 430 )) && bash benchmarks/issue16_targets.sh $R/i16 10
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all4.tgz" r4
