#!/usr/bin/env bash
# One device call for issue 4's open training measurement (fits the 600 s per-call limit): the GPU
# tests of the compiled training layer (the layer against eager, the trainer's warm-up, the traced
# InjectedLinear gradient that torch 2.11 got wrong before caf9f2c), then eager vs compiled reuse
# (prefill) side by side with own recompute. Compiling the 8B layer's forward + backward takes ~2 min
# per mode on a cold machine, hence few modes; pick others with ONLY=... (session 7 ran
# recompute,recompute_compiled,reuse_prefill_decode,reuse_prefill_decode_compiled and
# recompute,reuse_prefill,reuse_prefill_compiled,reuse_prefill_decode_ckpt_compiled).
# Usage (device machine, carry .bench):   ALCHEMIST_COMMIT=<hash> bash benchmarks/run_gpu_issue4.sh
# (writes $OUT/training/, $OUT/training.log)
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
timeout 200 python3 -m pytest -q -rs --tb=short -p no:logging tests/test_gpu.py tests/test_gpu_trainer_thread.py \
  tests/test_compiled_layer.py -k "compiled or fresh_rows or one_sequence or reuse_matches" 2>&1 | grep -v DEBUG | tail -60
timeout 380 python3 -m benchmarks.gpu_training --out "$OUT/training" --repeat 5 --skip-hf \
  --only "${ONLY:-recompute,reuse_prefill,reuse_prefill_compiled}" --profile "${PROFILE:-reuse_prefill_compiled}" \
  > "$OUT/training.log" 2>&1
grep -A8 '"vs_recompute"' "$OUT/training.log" || tail -30 "$OUT/training.log"
grep -B3 'grad_cosine_vs_recompute' "$OUT/training.log" | grep -v first_step | head -40
