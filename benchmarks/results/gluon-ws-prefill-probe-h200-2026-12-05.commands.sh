python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/r; cp run3.sh $OUT/r/commands.sh
M="--model-path llama-3.1-8b --load-format dummy --attention-backend"
FRESH_TRITON_CACHE=1 timeout 300 bash benchmarks/serving_ab.sh $OUT/r/cold-start 1 "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256 | --concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" "$M triton" "$M sage_attn"
grep -h "warm-up\|startup" $OUT/r/cold-start/server-*.log | cut -c1-160
timeout 60 python3 lab/gluon_ws_prefill_probe.py --seqs 1024 --rounds 1 --out $OUT/r/gluon-ws-smoke.json 2>&1 | tail -12
timeout 100 python3 lab/gluon_ws_prefill_probe.py --out $OUT/r/gluon-ws.json 2>&1 | tail -20
timeout 100 python3 -m pytest -q -m gpu tests/test_kernels_triton_attention.py tests/test_piecewise_graph.py 2>&1 | tail -4
cd $OUT && tar czf r.tgz r && rm -rf r
