set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call5
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
timeout 190 python3 -m sageserve bench offline --model-path llama-3.1-8b --load-format dummy \
  --backends triton,sage_attn --batch-sizes 1 --input-lens 32768 --output-lens 2 --rounds 1 \
  --out $R/offline-ttft.json > $R/offline-ttft.log 2>&1; echo "offline rc $?"; tail -8 $R/offline-ttft.log
