set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call1
mkdir -p $R
cp run1.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/card.txt
cat $R/card.txt
# 1. The Gluon kernel against the Triton prefill and fp64 (Q now loaded in the wgmma A layout).
timeout 200 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_gluon_prefill.py \
  -k "matches_triton" > $R/gluon-kernel-tests.log 2>&1; rc=$?; echo "tests rc $rc"
tail -3 $R/gluon-kernel-tests.log
[[ $rc -eq 0 ]] || exit 1
# 2. HEAD (Q converted into the A layout) against this tree, alternated A, B, A, B.
K="--variants sage_fp16pv_gluon,sage_fp16pv_gluon_norot,sdpa_cudnn --head-dims 128 --seq-lens 1024,8192,32768 --skip-decode --skip-store"
for round in 1 2; do
  PYTHONPATH=$PWD/.device/ab_old:$PYTHONPATH timeout 100 python3 -m sageserve bench kernels $K \
    --out $R/kernels-head-$round.json > $R/kernels-head-$round.log 2>&1; echo "head $round rc $?"
  timeout 100 python3 -m sageserve bench kernels $K --out $R/kernels-new-$round.json \
    > $R/kernels-new-$round.log 2>&1; echo "new $round rc $?"
done
grep -h "gluon\|cudnn" $R/kernels-*-1.log | head -30
# 3. The register rotation against the served wgmma rotation (lab varlen probe).
for mask in causal none; do
  timeout 150 python3 lab/gluon_ws_prefill_probe.py --varlen --pv fp16 --head-dim 128 --rotate on \
    --masks $mask --timings serving,prompt16k \
    --variants gluon_ws_varlen_persistent,gluon_ws_varlen_persistent_hreg \
    --out $R/hreg-$mask.json > $R/hreg-$mask.log 2>&1; echo "hreg $mask rc $?"
  grep '"timing"' $R/hreg-$mask.log | cut -c1-220
done
