set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
R=/tmp/r2; mkdir -p $R
export PYTHONPATH=$PWD/site:$PWD
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$SECONDS
timeout 120 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_kernels_sage_decode.py \
  -k configs_on_gpu > "$R/decode-gpu-tests.log" 2>&1; echo "decode GPU tests rc $?"
tail -3 "$R/decode-gpu-tests.log"
if (( mem > 100000 )); then
  bash benchmarks/issue17_gluon_check.sh "$R/i17" 8
  echo "elapsed $((SECONDS-start))"
  bash benchmarks/issue17_gluon_check.sh "$R/i17" 7
else
  bash benchmarks/issue17_gluon_check.sh "$R/i17" 7
  echo "elapsed $((SECONDS-start))"
  timeout $((570 - (SECONDS-start))) python3 lab/store_config_sweep.py --out "$R/store-sweep.json" \
    > "$R/store-sweep.log" 2>&1; echo "store sweep rc $?"
  tail -30 "$R/store-sweep.log"
fi
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all2.tgz" r2 && ls r2
