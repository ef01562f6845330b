set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call4
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu[sage_attn]" \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu[sage_attn-triton]" \
  --durations 4 > $R/gpu-tests-route.log 2>&1; echo "tests rc $?"
grep -E "passed|failed|FAILED|Error|^[0-9.]+s " $R/gpu-tests-route.log | tail -8
timeout 50 python3 lab/decode_config_sweep.py --shapes 1x512 --repeats 3 --out $R/sweep-plain.json > $R/sweep-plain.log 2>&1; echo "plain rc $?"; grep -E "default|fused|triton16|Error" $R/sweep-plain.log | head -5
CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 lab/decode_config_sweep.py --shapes 1x8192 --splits 4 --repeats 3 --out $R/sweep-s4.json > $R/sweep-s4.log 2>&1; echo "s4 rc $?"; grep -v "^\s*$" $R/sweep-s4.log | tail -12
