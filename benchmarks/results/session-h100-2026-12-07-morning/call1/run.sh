set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
R=/tmp/r; mkdir -p $R
export PYTHONPATH=$PWD/site:$PWD
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$SECONDS
dsweep() {
  timeout "$1" python3 lab/decode_config_sweep.py --shapes 64x8192 --repeats 5 \
    --out "$R/decode-sweep.json" > "$R/decode-sweep.log" 2>&1; echo "decode sweep rc $?"
  tail -28 "$R/decode-sweep.log"
}
if (( mem > 100000 )); then
  echo "== H200: decode sweep, issue 16 parts 8, 1"
  dsweep 150
  echo "elapsed $((SECONDS-start))"
  bash benchmarks/issue16_targets.sh "$R/i16" 8,1
else
  echo "== H100: decode sweep, issue 17 part 8 (balanced order)"
  dsweep 170
  echo "elapsed $((SECONDS-start))"
  bash benchmarks/issue17_gluon_check.sh "$R/i17" 8
fi
echo "elapsed $((SECONDS-start))"
cd /tmp && tar czf "$OUT/all.tgz" r && ls r
