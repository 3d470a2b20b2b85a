#!/usr/bin/env bash
# One device call (inside the 600 s limit): is the prefill step host-bound with and without the
# torch.compile'd fused ops, and what does serving with LoRA cost, packed per group against separate
# adapters (TTFT and decode step, interleaved, with an A/A control)?
# Usage (device machine):   ALCHEMIST_COMMIT=<hash> bash benchmarks/run_gpu_serving_host.sh
# (writes $OUT/prefill_host.log, $OUT/capture.log and their JSON)
set -u
source benchmarks/device_env.sh
timeout 270 python3 -m benchmarks.gpu_prefill_host --out "$OUT" \
  --samples 6 --modes none,prefill,none:unfused,none:lora,none:lora-separate > "$OUT/prefill_host.log" 2>&1
grep -E '^(none|prefill)' "$OUT/prefill_host.log"
timeout 300 python3 -m benchmarks.gpu_capture --out "$OUT/capture" --control --ttft-samples 30 --rounds 3 \
  --modes none,prefill,none:lora,none:lora-separate > "$OUT/capture.log" 2>&1
grep -A7 '_vs_none"\|packed_vs_separate' "$OUT/capture.log" | head -70
