#!/usr/bin/env bash
# Issue 16's "no speed lost" check in one device call: the GPU tests on the new tree, then the old tree
# (before the redesign, unpacked from .bench/old.tar) and the new one side by side, interleaved
# old/new/old/new: gpu_serving --quick (decode step at batch 1, 64 x (512 + 128) throughput) and
# gpu_training's eager recompute / reuse modes (no compile: the comparison is the host-side redesign).
# Prepare here:  git archive <old commit> -o .bench/old.tar   (and .bench/sharegpt.json)
# Usage (device machine, carry .bench):
#   OLD=<old commit> NEW=<new commit> STAGE=tests|serving|training [SIDES="new old"] bash benchmarks/run_gpu_issue16.sh
# Writes $OUT/<stage>-<old|new>-<i>/*.json and $OUT/<stage>.log.
set -u
source benchmarks/device_env.sh
NEW_TREE=$PWD
OLD_TREE=/tmp/old-tree
mkdir -p "$OLD_TREE" && tar -xf .bench/old.tar -C "$OLD_TREE" && ln -sfn "$NEW_TREE/.bench" "$OLD_TREE/.bench"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv

run_pair() {   # run_pair STAGE CMD...: old/new/old/new, each run's JSON under $OUT/STAGE-SIDE-I, its log beside
  local stage=$1; shift
  for i in 1 2; do
    for side in ${SIDES:-old new}; do
      local tree=$OLD_TREE commit=$OLD
      [ "$side" = new ] && { tree=$NEW_TREE; commit=$NEW; }
      (cd "$tree" && ALCHEMIST_COMMIT=$commit timeout "${RUN_TIMEOUT:-140}" "$@" --out "$OUT/$stage-$side-$i") \
        > "$OUT/$stage-$side-$i.log" 2>&1 || echo "$stage-$side-$i failed: $(tail -3 "$OUT/$stage-$side-$i.log")"
    done
  done
  python3 - "$OUT" "$stage" <<'PY'
import glob, json, sys
out, stage = sys.argv[1:]
for path in sorted(glob.glob(f"{out}/{stage}-*/*.json")):
    r = json.load(open(path))
    if "decode_b1" in r:
        print(path, "decode_b1", r["decode_b1"].get("step_ms"), "fixed",
              r.get("fixed_64x512+128_ours_only", {}).get("ours_tok_s"))
    else:
        print(path, {k: round(v, 3) for k, v in r.get("ratios", {}).get("vs_recompute", {}).items()},
              {k: round(r[k]["tok_s"]) for k in r if isinstance(r[k], dict) and "tok_s" in r[k]})
PY
}

case "${STAGE:-serving}" in
  tests)
    timeout 420 python3 -m pytest -q -rs --tb=short -p no:logging -m gpu --continue-on-collection-errors tests \
      2>&1 | grep -v DEBUG | tail -40 ;;
  serving)
    run_pair serving python3 -m benchmarks.gpu_serving --quick --repeat 5 ;;
  training)
    run_pair training python3 -m benchmarks.gpu_training --repeat 5 --skip-hf \
      --only recompute,reuse_prefill,reuse_prefill_decode ;;
esac
