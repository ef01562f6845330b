python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/r; cp run6.sh $OUT/r/commands.sh
python3 -m sageserve.launch_server --port 30123 --model-path llama-3.1-8b --load-format dummy --attention-backend sage_attn > $OUT/r/server.log 2>&1 &
for _ in $(seq 1 100); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break; sleep 1; done
python3 lab/first_request_probe.py --url http://127.0.0.1:30123 --requests 6 --out $OUT/r/first-request-probe.json
kill %1; cd $OUT && tar czf r.tgz r && rm -rf r
