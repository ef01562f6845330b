#!/usr/bin/env bash
# Every target of issue 16 (engine speed), measured in one call on one GPU, dummy
# Llama-3.1-8B bf16, triton and sage_attn alternated where a figure compares them:
#
#   bash benchmarks/issue16_targets.sh OUT_DIR [PARTS]
#
# PARTS: which of the parts below to run, e.g. 1,2 (default: all). Their time limits add up
# to more than one 10-minute device call: split them, e.g. "1,2,4", "3,5", "6,7", then
# "8,10,11".
#
# 1. offline: single stream (1 x 512 in, 128 out) and 64 x 8k, with the decode bound from
#    the copy bandwidth measured in the same run (`sageserve bench offline`);
# 2. GPU idle between decode steps at batch 1 and 64 (`benchmarks/profile_decode.py`);
# 3. HTTP from an empty Triton cache: 1 client (the first request's TTFT against the
#    next ones, the rate against offline) and 32 clients (ITL p99 / p50, errors), with the
#    kernels compiled while serving listed (`benchmarks/serving_ab.sh`);
# 4. the server's own TTFT of its first requests (`lab/first_request_probe.py`);
# 5. 32 clients with a prefill cap of 256 while decoding;
# 6. sampling in the decode graphs against the eager sampler (top-p requests; the sampling
#    graph GPU test first, whose failure skips the timing);
# 7. a capped prompt (448 tokens) arriving while 31 requests decode, each backend: wall time
#    against GPU busy time of the mixed step (`lab/step_latency_probe.py`), to see whether
#    sage_attn's mixed steps still leave the GPU idle (its 32-client ITL p99 was 3.5x p50
#    on an H100; the attention wrappers' host time was cut since, BENCHMARKS.md).
# 8. 64 x 8k decode alone, both backends (`sageserve bench offline`): the sage_attn / triton
#    ratio at 64 x 8k. Needs more than 80 GB (triton's cache alone needs 532k tokens): run it
#    on an H200 (the device tool's needs_h200).
# 9. Nsight Compute on one layer's decode at 64 x 8k, the 8-bit and the 16-bit kernel
#    (`bench kernels`' decode shape; needs `ncu` on the machine): what holds the 8-bit
#    kernel at 94% of the copy bandwidth where the 16-bit one reads at 106%
#    (lab/KERNEL_NOTES.md, "sage_decode: two instruction cuts that compile longer").
# 10. the served batch-1 GEMV (programmatic dependent launch) against cuBLAS, at its launch
#    setting and two others, norm + product pairs per Llama-3.1-8B weight
#    (`lab/pdl_gemv_probe.py`; `--configs` sweeps more).
# 11. single stream (1 x 512 in, 128 out) with the batch-1 GEMV on and off
#    (`--disable-fused-gemv`), both backends, two rounds alternated (`sageserve bench offline
#    --fused-gemv on,off`).
# 12. the GEMV at decode batches 2 and 4 (8 rows: cuBLAS's since the first run of this
#    part): the probe's norm + product pairs against cuBLAS at the served setting and three
#    others (`lab/pdl_gemv_probe.py --rows 2,4`), then `bench offline` at batches 1, 2, 4,
#    8 (512 in, 128 out) with the GEMV on and off, sage_attn, two rounds alternated.
# 13. K/V stores inside the piecewise graphs: their GPU tests (replay against eager, the
#    engine with piecewise graphs against every step eager, the shared parity test, whose
#    layer 1 goes through store and attend_stored) and the direct launches' engine test,
#    then 32 clients, 1024 in / 256 out, sage_attn, two rounds alternated:
#    stores inside the pieces (served), stores eagerly with attention (`lab/serve_variant.py
#    --piece-store off`), and stores inside with Triton's launches made directly
#    (`--direct-launch on`): ITL p99 / p50 and the server's mixed steps (wall, device wait);
#    before the servers, the next candidate's price: a mixed step's decode rows (split and
#    merge) launched eagerly against replayed from a CUDA graph, host µs per layer
#    (`lab/host_wrapper_probe.py --call decode`). Servers stop starting after 540 s of the
#    script.
# Each part has its own time limit, so that one stuck part leaves the others' results.
all_parts=1,2,3,4,5,6,7,8,9,10,11,12,13
source "$(dirname "$0")/parts.sh"
M="--model-path llama-3.1-8b --load-format dummy"

want 1 && timeout 200 python3 -m sageserve bench offline $M --backends triton,sage_attn \
  --batch-sizes 1,64 --input-lens 512,8192 --output-lens 128 --rounds 1 \
  --out "$out/offline.json" > "$out/offline.log" 2>&1
want 1 && tail -12 "$out/offline.log"

want 2 && timeout 150 python3 benchmarks/profile_decode.py --backends triton,sage_attn \
  --batch-sizes 1,64 --input-len 512 --steps 10 --out "$out/profile-decode.json" \
  > "$out/profile-decode.log" 2>&1
want 2 && tail -8 "$out/profile-decode.log"

want 3 && FRESH_TRITON_CACHE=1 timeout 330 bash benchmarks/serving_ab.sh "$out/serving" 1 \
  "--concurrency 1 --num-requests 6 --input-len 1024 --output-len 256 | --concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" \
  "$M --attention-backend triton" "$M --attention-backend sage_attn"

if want 4; then
  python3 -m sageserve.launch_server --port 30124 $M --attention-backend sage_attn \
    > "$out/probe-server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30124/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
  timeout 60 python3 lab/first_request_probe.py --url http://127.0.0.1:30124 --requests 4 \
    --out "$out/first-request-probe.json"
  kill $server; wait $server 2>/dev/null
fi

# 5. The 32-client ITL p99 / p50 with a smaller prefill cap while decoding (256 instead of
#    the default 448): the p99 steps were mixed steps with a 448-token chunk (BENCHMARKS.md).
want 5 && timeout 200 bash benchmarks/serving_ab.sh "$out/serving-cap256" 1 \
  "--concurrency 32 --num-requests 64 --input-len 1024 --output-len 256" \
  "$M --attention-backend triton --max-prefill-tokens-while-decoding 256" \
  "$M --attention-backend sage_attn --max-prefill-tokens-while-decoding 256"
if want 6; then
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graph.py \
    -k sampling_graphs > "$out/sampling-gpu-tests.log" 2>&1 \
    && timeout 240 python3 -m sageserve bench offline $M --backends triton \
      --sampling top-p --graph-sampling on,off --batch-sizes 1,64 --input-lens 512 \
      --output-lens 128 --rounds 2 --out "$out/sampling-top-p.json" > "$out/sampling.log" 2>&1
  tail -5 "$out/sampling-gpu-tests.log"; tail -12 "$out/sampling.log" 2>/dev/null
fi
if want 7; then
  for backend in triton sage_attn; do
    timeout 150 python3 lab/step_latency_probe.py --backend "$backend" --new-len 448 \
      --out "$out/mixed-step-$backend.json" > "$out/mixed-step-$backend.log" 2>&1
    python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['mixed']; \
print(sys.argv[2], 'step at arrival, next (ms, rows):', m['steps_after_arrival'][:2], \
'GPU busy ms:', round(m['gpu_busy_ms'], 1), 'of a', round(m['window_ms'], 1), 'ms window')" \
      "$out/mixed-step-$backend.json" "$backend" || tail -4 "$out/mixed-step-$backend.log"
  done
fi
want 8 && timeout 200 python3 -m sageserve bench offline $M --backends triton,sage_attn \
  --batch-sizes 64 --input-lens 8192 --output-lens 128 --rounds 1 \
  --out "$out/offline-64x8k.json" > "$out/offline-64x8k.log" 2>&1
want 8 && tail -10 "$out/offline-64x8k.log"
if want 9; then
  timeout 150 ncu --clock-control none --kernel-name regex:decode_split_kernel --launch-count 4 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section Occupancy \
    python3 -m sageserve bench kernels --skip-prefill --skip-store \
    --decode-variants sage_fp16pv,triton16 --decode-batches 64 --decode-contexts 8192 \
    --repeats 1 --warmup 1 --out "$out/ncu-decode-bench.json" > "$out/ncu-decode-64x8k.txt" 2>&1
  grep -E "decode_split_kernel|Duration|DRAM Throughput|Issue Slots Busy|No Eligible" \
    "$out/ncu-decode-64x8k.txt" | head -30
fi
want 10 && timeout 150 python3 lab/pdl_gemv_probe.py --out "$out/pdl-gemv.json" \
  > "$out/pdl-gemv.log" 2>&1
want 10 && tail -14 "$out/pdl-gemv.log"
want 11 && timeout 150 python3 -m sageserve bench offline $M --backends sage_attn,triton \
  --fused-gemv on,off --batch-sizes 1 --input-lens 512 --output-lens 128 --rounds 2 \
  --out "$out/offline-gemv.json" > "$out/offline-gemv.log" 2>&1
want 11 && tail -12 "$out/offline-gemv.log"
want 12 && timeout 150 python3 lab/pdl_gemv_probe.py --rows 2,4 \
  --configs 8x1024x4,4x2048x4,8x512x4,16x512x4 --out "$out/pdl-gemv-rows.json" \
  > "$out/pdl-gemv-rows.log" 2>&1
want 12 && grep -E "cublas|served" "$out/pdl-gemv-rows.log" | cut -c1-80
want 12 && timeout 200 python3 -m sageserve bench offline $M --backends sage_attn \
  --fused-gemv on,off --batch-sizes 1,2,4,8 --input-lens 512 --output-lens 128 --rounds 2 \
  --out "$out/offline-gemv-rows.json" > "$out/offline-gemv-rows.log" 2>&1
want 12 && tail -12 "$out/offline-gemv-rows.log"
want 13 && timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_piecewise_graph.py tests/test_cuda_graph.py -k "piecewise or direct" \
  > "$out/piece-store-gpu-tests.log" 2>&1
want 13 && tail -3 "$out/piece-store-gpu-tests.log"
want 13 && timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_attention_backends.py > "$out/parity-gpu-tests.log" 2>&1
want 13 && tail -3 "$out/parity-gpu-tests.log"
want 13 && timeout 120 python3 lab/host_wrapper_probe.py --device cuda --call decode \
  --repeats 1000 > "$out/decode-graph-probe.json" 2> "$out/decode-graph-probe.log"
want 13 && cat "$out/decode-graph-probe.json"
if want 13; then
  for round in 1 2; do
    for variant in "store-in" "store-eager:--piece-store off" "store-in-direct:--direct-launch on"; do
      (( SECONDS > 540 )) && { echo "part 13: no time left for $variant, round $round"; continue; }
      name="c32-sage_attn-${variant%%:*}-r$round"
      flags=""; [[ $variant == *:* ]] && flags=${variant#*:}
      python3 lab/serve_variant.py $flags -- --port 30123 $M --attention-backend sage_attn \
        > "$out/server-$name.log" 2>&1 &
      pid=$!
      for _ in $(seq 1 200); do
        kill -0 $pid 2>/dev/null || { echo "[$name] server died"; break; }
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=2)" 2>/dev/null && break
        sleep 0.5
      done
      timeout 90 python3 -m sageserve bench serving --url http://127.0.0.1:30123 \
        --concurrency 32 --num-requests 64 --input-len 1024 --output-len 256 \
        --out "$out/bench-$name.json" 2>&1 | grep -E "ITL|server steps" | sed "s/^/[$name] /"
      kill $pid; wait $pid 2>/dev/null; sleep 2
    done
  done
fi
true  # a part left out is not a failure
