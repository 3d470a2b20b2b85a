#!/usr/bin/env bash
# One device call for issue 2: GPU tests, then the serving benchmark. Usage (device machine):
#   bash benchmarks/run_gpu_issue2.sh   (writes $OUT/gpu_serving.json and $OUT/log)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
set -o pipefail; python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -15 || exit 1
python3 -m benchmarks.gpu_serving --out "$OUT" --sharegpt .bench/sharegpt.json "$@" 2>&1 | grep -v Warning
