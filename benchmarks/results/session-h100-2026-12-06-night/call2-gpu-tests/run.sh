set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call2
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/card.txt
cat $R/card.txt
timeout 430 python3 -m pytest -q -m gpu -p no:cacheprovider -k "not engine_with" \
  tests/test_attention_backends.py tests/test_cuda_graph.py tests/test_piecewise_graph.py \
  tests/test_sage_rotation.py tests/test_static_metadata.py tests/test_sage.py \
  tests/test_gluon_prefill.py \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu[sage_attn]" \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu[sage_attn-triton]" \
  --durations 8 > $R/gpu-tests-a.log 2>&1; echo "tests rc $?"
grep -E "passed|failed|FAILED|Error|^[0-9.]+s " $R/gpu-tests-a.log | tail -22
timeout 110 python3 lab/decode_config_sweep.py --shapes 1x512,1x8192,16x8192 --splits 1,4,16 --repeats 5 --out $R/decode-splits.json > $R/decode-splits.log 2>&1; echo "sweep rc $?"; tail -40 $R/decode-splits.log
