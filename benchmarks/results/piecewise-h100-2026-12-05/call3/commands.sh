python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
M="--model-path llama-3.1-8b --load-format dummy --attention-backend"
timeout 110 bash benchmarks/serving_ab.sh $OUT/itl-defaults 1 "--concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" "$M triton" "$M sage_attn"
grep -h "prefill tokens of a step\|piecewise" $OUT/itl-defaults/server-*-r1.log | cut -c1-200
timeout 90 bash benchmarks/serving_ab.sh $OUT/one-client 1 "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256" "$M triton" "$M sage_attn"
timeout 130 python3 -m sageserve bench offline --model-path llama-3.1-8b --load-format dummy --backends triton,sage_attn --batch-sizes 1 --input-lens 1024 --output-lens 256 --rounds 1 --out $OUT/offline-1x1024x256 2>&1 | tail -8
