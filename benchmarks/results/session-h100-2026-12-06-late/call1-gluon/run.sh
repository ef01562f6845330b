#!/usr/bin/env bash
# Device call 1 (carries .whl and .device/gguf_a): the GPU tests that need no GGUF, then
# the two-ring probe.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
o=$OUT/c1; mkdir -p $o
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $o/card.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $o/card.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
  tests/test_gluon_prefill.py -k "not engine_with_the_gluon" > $o/gluon-tests.log 2>&1
echo "gluon tests rc=$?"; tail -12 $o/gluon-tests.log
timeout 230 python3 lab/gluon_ws_prefill_probe.py --varlen --pv fp16 --head-dim 128 \
  --rotate on --timings serving,prompt16k \
  --variants gluon_ws_varlen_persistent,gluon_ws_varlen_persistent_k128_pre \
  --out $o/two-rings.json > $o/two-rings.log 2>&1
echo "probe rc=$?"; grep '"timing"' $o/two-rings.log | cut -c1-220; tail -3 $o/two-rings.log | cut -c1-300
