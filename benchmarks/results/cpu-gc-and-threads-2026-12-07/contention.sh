cd /work/main
run() { # name engine env
  env $3 PYTHONPATH=. .venv/bin/python lab/serve_variant.py --engine $2 -- --port 30178 --max-running-requests 8 > /tmp/cont-$1.log 2>&1 &
  pid=$!
  for i in $(seq 1 90); do curl -sf localhost:30178/health >/dev/null && break; sleep 1; done
  python3 -c "while True: pass" & b1=$!
  python3 -c "while True: pass" & b2=$!
  sleep 1
  for rep in 1 2 3; do
    .venv/bin/python - <<'PY'
import time, httpx, concurrent.futures as cf
body={"text":"The capital of France is","sampling_params":{"max_new_tokens":8,"ignore_eos":True,"temperature":0}}
t=time.perf_counter()
with cf.ThreadPoolExecutor(4) as ex:
    rs=list(ex.map(lambda _: httpx.post("http://127.0.0.1:30178/generate", json=body, timeout=60).status_code, range(4)))
print(f"{time.perf_counter()-t:.2f}", rs)
PY
  done | sed "s/^/[$1] /"
  kill $b1 $b2; kill $pid; wait $pid 2>/dev/null; sleep 2
}
run process process ""
run thread thread ""
run process-omp1 process "OMP_NUM_THREADS=1"
run thread-omp1 thread "OMP_NUM_THREADS=1"
run process-2 process ""
