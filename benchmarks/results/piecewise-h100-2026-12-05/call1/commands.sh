python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python3 -m pytest -m gpu -q tests/test_piecewise_graph.py tests/test_cuda_graph.py -k "piecewise or engine_with_graphs or overlap" 2>&1 | tail -15 | tee $OUT/gpu_tests.log
timeout 110 python3 lab/step_latency_probe.py --backend triton --new-len 256 --out $OUT/probe-triton-new256.json > $OUT/probe-triton.log 2>&1
grep -i "piecewise\|captured\|first-req" $OUT/probe-triton.log | head -12
python3 -c "
import json; r=json.load(open('$OUT/probe-triton-new256.json'))['mixed']
print({k: r[k] for k in ('decode_step_ms','steps_after_arrival','profiled_steps_ms','gpu_busy_ms','kernels','window_ms','host_profiled_steps_ms')})"
M="--model-path llama-3.1-8b --load-format dummy --attention-backend"
timeout 150 bash benchmarks/serving_ab.sh $OUT/serving-itl-piecewise 1 "--concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" "$M triton" "$M triton --max-prefill-tokens-while-decoding 448"
grep -h "CUDA graphs\|warm-up" $OUT/serving-itl-piecewise/server-1-r1.log | head -6
timeout 80 bash benchmarks/serving_ab.sh $OUT/serving-1client 1 "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256" "$M triton"
