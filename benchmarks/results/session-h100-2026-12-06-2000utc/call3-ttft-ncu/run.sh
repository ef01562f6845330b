set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/w; mkdir -p $R; cp run3.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/card.txt
M="--model-path llama-3.1-8b --load-format dummy --batch-sizes 1 --input-lens 32768,8192 --output-lens 2 --rounds 1"
for round in 1 2; do
  for b in "triton auto" "sage_attn auto" "sage_attn triton"; do
    set -- $b
    timeout 75 python3 -m sageserve bench offline $M --backends $1 --sage-impl $2 \
      --out $R/ttft-$1-$2-$round.json > $R/ttft-$1-$2-$round.log 2>&1
    echo "round $round $1 $2 rc $?: $(grep -E '^\| (triton|sage_attn) ' $R/ttft-$1-$2-$round.log | head -2 | tr '\n' ' ' | cut -c1-220)"
  done
done
which ncu && for rot in "" "--no-rotate"; do
  timeout 100 ncu --nvtx --nvtx-include "profiled/" --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section Occupancy \
    python3 lab/gluon_ws_ncu_target.py --pv fp16 --block-keys 64 $rot > $R/ncu-noncausal$rot.txt 2>&1
  echo "ncu $rot rc $?"; grep -E "Duration|Bank Conflicts|L1/TEX Hit|Shared Memory|Stall|Throughput" $R/ncu-noncausal$rot.txt | head -20
done
cd $OUT && tar czf call3.tgz w && rm -rf w
