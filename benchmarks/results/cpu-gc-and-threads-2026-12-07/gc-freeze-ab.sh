cd /work/main
for v in nofreeze freeze nofreeze freeze; do
  extra=""; [ $v = nofreeze ] && extra="--disable-gc-freeze"
  PYTHONPATH=. .venv/bin/python lab/serve_variant.py --engine process -- --port 30177 --max-running-requests 8 $extra > /tmp/cpu-server-$v.log 2>&1 &
  pid=$!
  for i in $(seq 1 90); do curl -sf localhost:30177/health >/dev/null && break; sleep 1; done
  echo "== $v ready after $i s"
  .venv/bin/python -m sageserve bench serving --url http://127.0.0.1:30177 --concurrency 8 --num-requests 48 --input-len 128 --output-len 64 2>&1 | grep -E "ITL|gc|tok/s|steps|first TTFT"
  kill $pid; wait $pid 2>/dev/null; sleep 2
done
