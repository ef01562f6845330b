#!/usr/bin/env bash
# Issue 18 on one CUDA GPU: `--sage-rotation-kernel prepass` (prefill queries rotated and
# quantized by one pass before the Triton prefill; the default at head_dim >= 128 since
# 2026-12-06) checked, then timed, each part under its own time limit:
#
#   bash benchmarks/prepass_check.sh OUT_DIR [PARTS]
#
# 1. GPU tests: the pass against the torch math, the shared parity test's prepass variant,
#    piecewise CUDA-graph replay against eager with it, nothing compiled while serving;
# 2. `bench kernels`: the rotation's price, in-kernel butterfly (`_bfly`) against the pass and no
#    rotation, head_dim 128 and 64, causal, 1k / 8k / 32k;
# 3. `bench offline`: TTFT of one 32k prompt, sage_attn with the pass against the
#    butterfly (dummy Llama-3.1-8B bf16).
# A failing part 1 stops the script.
all_parts=1,2,3
source "$(dirname "$0")/parts.sh"

if want 1; then
  timeout 300 python3 -m pytest -x -q -m gpu -p no:cacheprovider -k "prepass or bf16_rows" \
    tests/test_kernels_quantize_q.py tests/test_piecewise_graph.py \
    "tests/test_attention_backends.py::test_backend_matches_dense_reference_on_gpu" \
    "tests/test_server_route_warmup.py::test_nothing_compiles_while_serving_on_gpu" \
    > "$out/gpu-tests.log" 2>&1
  status=$?
  tail -6 "$out/gpu-tests.log"
  [[ $status -eq 0 ]] || { echo "GPU tests failed ($status): no timings"; exit 1; }
fi

want 2 && timeout 200 python3 -m sageserve bench kernels \
  --variants sage_fp16pv_bfly,sage_fp16pv_prerot,sage_fp16pv_norot,sdpa_cudnn --head-dims 128,64 \
  --seq-lens 1024,8192,32768 --causal causal --skip-decode --skip-store \
  --out "$out/kernels.json" > "$out/kernels.log" 2>&1
want 2 && tail -20 "$out/kernels.log"

for kind in butterfly prepass; do
  want 3 && timeout 150 python3 -m sageserve bench offline --model-path llama-3.1-8b \
    --load-format dummy --backends sage_attn --sage-rotation-kernel "$kind" --batch-sizes 1 \
    --input-lens 32768 --output-lens 2 --rounds 2 --out "$out/offline-$kind.json" \
    > "$out/offline-$kind.log" 2>&1
  want 3 && tail -4 "$out/offline-$kind.log"
done
true  # a part left out is not a failure
