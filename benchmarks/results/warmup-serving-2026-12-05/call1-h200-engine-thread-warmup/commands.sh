python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cp run1.sh $OUT/commands.sh
M="--model-path llama-3.1-8b --load-format dummy --attention-backend"
FRESH_TRITON_CACHE=1 timeout 430 bash benchmarks/serving_ab.sh $OUT/cold-start 1 "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256 | --concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" "$M triton" "$M sage_attn"
grep -h "warm-up\|startup" $OUT/cold-start/server-*.log | cut -c1-160
timeout 140 python3 lab/gemv_probe.py --out $OUT/gemv.json 2>&1 | tail -45
