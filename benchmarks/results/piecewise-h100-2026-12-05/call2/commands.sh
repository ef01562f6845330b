python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 -m pytest -m gpu -q tests/test_piecewise_graph.py 2>&1 | tail -3 | tee $OUT/gpu_tests.log
M="--model-path llama-3.1-8b --load-format dummy --attention-backend triton"
B="--concurrency 32 --num-requests 64 --input-len 1024 --output-len 256"
timeout 70 bash benchmarks/serving_ab.sh $OUT/itl-cap448-switch5ms 1 "$B" "$M --max-prefill-tokens-while-decoding 448"
grep -h "piecewise" $OUT/itl-cap448-switch5ms/server-1-r1.log | tail -1 | cut -c1-200
echo "import sys; sys.setswitchinterval(0.0005)" > site/sitecustomize.py
python3 -c "import sys; print('switch interval', sys.getswitchinterval())"
timeout 140 bash benchmarks/serving_ab.sh $OUT/itl-switch05ms 1 "$B" "$M --max-prefill-tokens-while-decoding 448" "$M"
