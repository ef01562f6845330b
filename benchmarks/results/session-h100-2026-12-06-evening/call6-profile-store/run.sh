set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call6
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/card.txt
bash benchmarks/issue16_targets.sh $R/i16 2 2>&1 | tail -3
python3 - $R/i16/profile-decode.json <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["points"]:
    print(p["backend"], p["batch"], "wall", round(p["wall_ms_per_step"], 3), "unprofiled", round(p["unprofiled_wall_ms_per_step"], 3), "busy", round(p["gpu_busy_ms_per_step"], 3), "idle share unprofiled", round(p["idle_share_unprofiled"], 4), "launch gaps", round(p["idle_in_launch_gaps_ms_per_step"], 3), "host", round(p["idle_waiting_for_host_ms_per_step"], 3))
PY
rm -f $R/i16/profile-decode.log
timeout 90 python3 -m sageserve bench kernels --skip-prefill --skip-decode \
  --store-variants sage_fp16pv,sage_fp16pv_tcrot,sage_fp16pv_norot,triton16 \
  --store-tokens 448,16384 --store-kv-heads 8 --head-dims 128 \
  --out $R/store.json > $R/store.log 2>&1; tail -12 $R/store.log
