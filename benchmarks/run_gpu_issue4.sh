#!/usr/bin/env bash
# One device call for issue 4's open measurements (fits the 600 s per-call limit on a warm or cold
# machine): the GPU tests of the compiled training layer, then eager vs compiled training modes side by
# side, then capture overhead with its A/A control. Usage (device machine, carry .bench):
#   bash benchmarks/run_gpu_issue4.sh   (writes $OUT/training/, $OUT/capture/ and logs)
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
timeout 240 python3 -m pytest -q -rs tests/test_gpu.py -k "compiled or varlen" 2>&1 | tail -15
timeout 300 python3 -m benchmarks.gpu_training --out "$OUT/training" --repeat 5 --skip-hf --only \
  recompute,recompute_compiled,reuse_prefill,reuse_prefill_compiled,reuse_prefill_decode,reuse_prefill_decode_compiled,reuse_prefill_decode_ckpt_compiled \
  > "$OUT/training.log" 2>&1
grep -A12 '"vs_recompute"' "$OUT/training.log" || tail -30 "$OUT/training.log"
timeout 120 python3 -m benchmarks.gpu_capture --out "$OUT/capture" --control > "$OUT/capture.log" 2>&1
grep -A6 '_vs_none"' "$OUT/capture.log" || tail -30 "$OUT/capture.log"
