python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
mkdir -p $OUT/r; cp run7.sh $OUT/r/commands.sh
python3 -m sageserve.launch_server --port 30123 --model-path llama-3.1-8b --load-format dummy --attention-backend sage_attn > $OUT/r/server.log 2>&1 &
for _ in $(seq 1 70); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break; sleep 1; done
S='import httpx, lab.first_request_probe as p; print(p.server_ttft_sum(httpx.Client(base_url="http://127.0.0.1:30123")))'
for seed in 1 2 3; do
  a=$(python3 -c "$S"); python3 -m sageserve bench serving --url http://127.0.0.1:30123 --concurrency 1 --num-requests 2 --input-len 1024 --output-len 16 --seed $seed --out $OUT/r/bench-$seed.json | grep "first TTFT"; b=$(python3 -c "$S")
  echo "server-side TTFT sum of those 2 requests: $(python3 -c "print(round(($b - $a) * 1e3, 1))") ms"
done
kill %1; cd $OUT && tar czf r.tgz r && rm -rf r
