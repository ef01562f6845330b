python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/r; cp run4.sh $OUT/r/commands.sh
M="--model-path llama-3.1-8b --load-format dummy --attention-backend"
FRESH_TRITON_CACHE=1 timeout 330 bash benchmarks/serving_ab.sh $OUT/r/cold-start 1 "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256 | --concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" "$M triton" "$M sage_attn"
grep -h "warm-up\|startup\|CRITICAL" $OUT/r/cold-start/server-*.log | cut -c1-160
cd $OUT && tar czf r.tgz r && rm -rf r
