#!/usr/bin/env bash
# Issue 20 on the H200, one device call (fits the 600 s per-call limit): the LoRA kernel GPU tests, then
# end-to-end TTFT / decode step with LoRA r16 on all projections per engine.lora_kernel against no LoRA
# (gpu_capture, modes interleaved sample by sample; `lora_overhead_by_kernel` in the JSON), then the
# per-group kernel microbenchmark. STAGE=overlap instead: the overlapped-scheduling GPU tests, then
# gpu_overlap (decode at batch 1 and 64 x (512 + 128) throughput, overlap off / on in one job).
# Usage (device machine):  bash benchmarks/run_gpu_issue20.sh   -> $OUT/capture/gpu_capture.json, $OUT/lora/*.json
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ "${STAGE:-lora}" = overlap ]; then
  timeout 200 python3 -m pytest -q -rs --tb=short -p no:logging -m gpu tests/test_overlap_gpu.py 2>&1 | tail -15
  timeout 360 python3 -m benchmarks.gpu_overlap --out "$OUT/overlap" > "$OUT/overlap.log" 2>&1 \
    || { echo "gpu_overlap failed:"; tail -20 "$OUT/overlap.log"; }
  grep -A3 '"ratios"' "$OUT/overlap/gpu_overlap.json"
  exit 0
fi
timeout 150 python3 -m pytest -q -rs --tb=short -p no:logging -m gpu tests/test_lora_kernels.py 2>&1 | tail -15
timeout "${CAPTURE_TIMEOUT:-300}" python3 -m benchmarks.gpu_capture --out "$OUT/capture" --control \
  --modes "${MODES:-none,none:lora,none:lora-folded,none:lora-triton,prefill,prefill:lora-folded}" \
  > "$OUT/capture.log" 2>&1 || { echo "gpu_capture failed:"; tail -20 "$OUT/capture.log"; }
python3 - "$OUT/capture/gpu_capture.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no result")
print("lora_overhead_by_kernel", json.dumps(r.get("lora_overhead_by_kernel")))
for k, v in r.items():
    if k.endswith("_vs_none"):
        print(k, {m: round(x, 3) for m, x in v.items() if isinstance(x, float)})
PY
timeout 120 python3 -m benchmarks.gpu_lora_kernels --out "$OUT/lora" > "$OUT/lora.log" 2>&1; echo "gpu_lora_kernels rc $?"
