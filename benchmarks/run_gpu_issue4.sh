#!/usr/bin/env bash
# One device call for issue 4's open training measurement (fits the 600 s per-call limit): the GPU
# tests of the compiled training layer, then eager vs compiled training side by side. Compiling the 8B
# layer's forward + backward takes minutes on a cold machine, hence few modes; add the rest (ONLY=...)
# in a second call, which finds the graphs in the warm machine's .inductor cache. Usage (device
# machine, carry .bench):   ALCHEMIST_COMMIT=<hash> bash benchmarks/run_gpu_issue4.sh   (writes $OUT/training/, logs)
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
timeout 150 python3 -m pytest -q -rs --tb=short -p no:logging tests/test_gpu.py -k "compiled or varlen" 2>&1 | grep -v DEBUG | tail -60
timeout 420 python3 -m benchmarks.gpu_training --out "$OUT/training" --repeat 5 --skip-hf \
  --only "${ONLY:-recompute,recompute_compiled,reuse_prefill_decode,reuse_prefill_decode_compiled}" \
  > "$OUT/training.log" 2>&1
grep -A8 '"vs_recompute"' "$OUT/training.log" || tail -30 "$OUT/training.log"
