#!/usr/bin/env bash
# Issue 18 on the H200, one device call per stage (each fits the 600 s per-call limit).
#   STAGE=training    gpu_training (8B, 8k-token step) with every record of the host-tier modes in pinned
#                     host memory: reuse_host_hedged (the fetch planner) beside reuse_host_naive (fetch all)
#                     and recompute; `ratios.vs_recompute` is the acceptance key
#   STAGE=colocation  gpu_colocation at 50% load, 30% rated, ratings after a log-normal delay (median 20 s,
#                     p90 120 s), 30 GiB device pool + 64 GiB host pool, eager layers with reuse;
#                     OPT_IN=1 adds --opt-in; `reuse_flops_share` per run in the JSON
# Usage (device machine, carry .bench):  STAGE=training bash benchmarks/run_gpu_issue18.sh
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "${STAGE:-training}" in
  training)
    timeout "${RUN_TIMEOUT:-540}" python3 -m benchmarks.gpu_training --out "$OUT/training" --skip-hf \
      --pool-cpu-gib 32 --only recompute,reuse_prefill_decode,reuse_host_hedged,reuse_host_naive \
      > "$OUT/training.log" 2>&1 || { echo "gpu_training failed:"; tail -20 "$OUT/training.log"; }
    grep -E '^(recompute|reuse)' "$OUT/training.log" | cut -c1-220
    python3 -c "import json,sys; r=json.load(open('$OUT/training/gpu_training.json')); print(r['ratios']['vs_recompute']); print(r.get('fetch_rates'))" ;;
  colocation)
    timeout "${RUN_TIMEOUT:-570}" python3 -m benchmarks.gpu_colocation --out "$OUT/colocation" --duration "${DURATION:-60}" \
      --pool-gib 30 --pool-cpu-gib 64 --load 0.5 --seed "${SEED:-0}" --modes thread \
      --rating-delay lognormal:20:120 --rating-wait-s "${WAIT:-150}" --standalone-records 0 \
      ${OPT_IN:+--opt-in} > "$OUT/colocation.log" 2>&1 || { echo "gpu_colocation failed:"; tail -20 "$OUT/colocation.log"; }
    grep -E '^(off|on)' "$OUT/colocation.log" | cut -c1-300
    python3 -c "
import json, glob
for f in glob.glob('$OUT/colocation/*.json'):
    r = json.load(open(f))
    for load, runs in r.get('loads', {}).items():
        for tag, x in runs.items():
            if tag.startswith('on '):
                print(f, load, tag, 'reuse_flops_share', x.get('reuse_flops_share'), 'tbt p99 x', x['ratio_on_off']['tbt_p99_ms'])
" ;;
esac
