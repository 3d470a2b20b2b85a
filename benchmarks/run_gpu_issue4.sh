#!/usr/bin/env bash
# One device call for issue 4's open training measurement (fits the 600 s per-call limit): every GPU
# test (among them the compiled layer against eager, the trainer's warm-up, reuse against recompute in
# bf16) and the CPU test of the traced InjectedLinear gradient that torch 2.11 got wrong before
# caf9f2c; then eager vs compiled reuse (prefill) side by side with own recompute. Compiling the 8B
# layer's forward + backward takes ~2 min per mode on a cold machine, hence few modes; pick others
# with ONLY=... and the profiled one with PROFILE=... (session 7 ran
# recompute,recompute_compiled,reuse_prefill_decode,reuse_prefill_decode_compiled and
# recompute,reuse_prefill,reuse_prefill_compiled,reuse_prefill_decode_ckpt_compiled).
# Usage (device machine, carry .bench):   ALCHEMIST_COMMIT=<hash> bash benchmarks/run_gpu_issue4.sh
# (writes $OUT/training/, $OUT/training.log)
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
timeout 240 python3 -m pytest -q -rs --tb=short -p no:logging -m gpu --continue-on-collection-errors tests 2>&1 | grep -v DEBUG | tail -40
timeout 60 python3 -m pytest -q --tb=short -p no:logging tests/test_compiled_layer.py -k fresh_rows 2>&1 | tail -5
timeout "${TRAIN_TIMEOUT:-300}" python3 -m benchmarks.gpu_training --out "$OUT/training" --repeat 5 --skip-hf \
  --only "${ONLY:-recompute,reuse_prefill,reuse_prefill_compiled}" --profile "${PROFILE:-reuse_prefill_compiled}" \
  > "$OUT/training.log" 2>&1
grep -A8 '"vs_recompute"' "$OUT/training.log" || tail -30 "$OUT/training.log"
grep -B3 'grad_cosine_vs_recompute' "$OUT/training.log" | grep -v first_step | head -40
