#!/usr/bin/env bash
# Issue 17 on the H200, one device call per stage (each fits the 600 s per-call limit).
#   STAGE=tests       every GPU test
#   STAGE=graphs      the graphed training layers' GPU tests, then gpu_training (8B, 2048-token step, host
#                     sleeping while it waits) eager recompute beside the graphed recompute, then the other
#                     GPU tests in the time left; writes $OUT/training/gpu_training.json
#   STAGE=colocation  gpu_colocation (8B shape, ShareGPT, 30% rated, 30 GiB pool, 30 s windows) at LOADS,
#                     seed SEED, the latency budget (`thread`, the default) beside the fixed duty of before
#                     (`thread:slo=none:duty=0.25:yield=256`) on the same schedule, then the standalone phase;
#                     ratings come the moment their answer ends unless DELAY=lognormal:20:120 (issue 18's timing)
# Usage (device machine, carry .bench):  STAGE=colocation SEED=0 LOADS=0.5,0.25 bash benchmarks/run_gpu_issue17.sh
# Writes $OUT/colocation/*.json (one file per load: gpu_colocation-seed<S>-load<L>.json) and $OUT/*.log.
set -u
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
case "${STAGE:-colocation}" in
  graphs)
    timeout 240 python3 -m pytest -q -rs --tb=short -p no:logging -m gpu tests/test_gpu_graphed.py 2>&1 | tail -15
    timeout "${TRAIN_TIMEOUT:-240}" python3 -m benchmarks.gpu_training --out "$OUT/training" --step-tokens 2048 \
      --skip-hf --blocking-sync --only "${ONLY:-recompute,recompute_graphed,reuse_prefill_decode}" > "$OUT/gpu_training.log" 2>&1 \
      || { echo "gpu_training failed:"; tail -25 "$OUT/gpu_training.log"; }
    grep -E '^(recompute|reuse|graphs)' "$OUT/gpu_training.log"
    timeout "${TEST_TIMEOUT:-60}" python3 -m pytest -q -rs --tb=short -p no:logging -m gpu \
      --continue-on-collection-errors tests --ignore=tests/test_gpu_graphed.py 2>&1 | grep -v DEBUG | tail -25 ;;
  tests)
    timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -rs --tb=short -p no:logging -m gpu \
      --continue-on-collection-errors tests 2>&1 | grep -v DEBUG | tail -40 ;;
  colocation)
    timeout "${RUN_TIMEOUT:-570}" python3 -m benchmarks.gpu_colocation --out "$OUT/colocation" --duration "${DURATION:-30}" \
      --pool-gib 30 --load "${LOADS:-0.5,0.25}" --seed "${SEED:-0}" \
      --modes "${MODES:-thread,thread:slo=none:duty=0.25:yield=256}" --rating-delay "${DELAY:-none}" ${EXTRA:-} > "$OUT/colocation.log" 2>&1 \
      || { echo "gpu_colocation failed:"; grep -v '^ ' "$OUT/colocation.log" | tail -25; }
    python3 - "$OUT/colocation/gpu_colocation.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no result")
print("commit", r["commit"], "capacity req/s", round(r["capacity"]["req_s"], 2))
for load, runs in r["loads"].items():
    off = runs["off"]
    print(f"load {load}: off tbt p99 {off['tbt_p99_ms']:.1f} ms ttft p99 {off['ttft_p99_ms']:.0f} ms")
    for tag, x in runs.items():
        if not tag.startswith("on "):
            continue
        ratio = x["ratio_on_off"]
        print(f"  {tag}: tbt p99 x{ratio['tbt_p99_ms']:.2f} p50 x{ratio['tbt_p50_ms']:.2f} ttft p99 x{ratio['ttft_p99_ms']:.2f}"
              f" | trained {x['trained_tok_s']:.0f} tok/s ({x.get('trained_share_of_standalone', 0):.2f} of standalone)"
              f" steps {x['train_steps']} step {x['train_step_ms']:.0f} ms cpu {x['train_cpu_ms_per_step']:.0f} ms"
              f" | backlog end {x['backlog_at_window_end']['backlog_ratings']} ratings"
              f" {x['backlog_at_window_end']['backlog_tokens']} tok fits {x['backlog_fits_one_step']}"
              f" | reuse {x['reuse_tokens']}/{x['trained_tokens']} stale {x['staleness']} budget {x['latency_budget']}"
              f" err {x['train_error']}")
s = r.get("standalone")
if s:
    print("standalone:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items() if k != "own_recompute"})
PY
    ;;
esac
