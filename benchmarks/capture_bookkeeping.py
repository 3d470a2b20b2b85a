"""Host time of capture bookkeeping for one prompt step (no GPU needed): reservation with LRU eviction,
the slot mapping of every position, its tensor, and the commit — on the 8B layout (a `meta`-device
pool, so no memory is taken). Prints one JSON line.

    python -m benchmarks.capture_bookkeeping [--prompt-len 1024] [--pool-gib 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import emit, git_commit
from engine.capture import CaptureManager
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from store.activation_pool import ActivationPool
from store.pool_layout import GROUPS, PoolLayout

LLAMA_8B_DIMS = {"q": 4096, "k": 1024, "v": 1024, "o": 4096, "gate": 14336, "up": 14336, "down": 4096}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--pool-gib", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    layout = PoolLayout(32, LLAMA_8B_DIMS, torch.bfloat16, torch.device("meta"), GROUPS)
    pool = ActivationPool(layout, int(args.pool_gib * (1 << 30)), 16)
    capture = CaptureManager(pool, captures_decode=False)
    params = SamplingParams(max_tokens=1)
    times = []
    for i in range(args.steps):            # the pool fills after a few prompts: later ones evict
        seq = Sequence(i, f"r{i}", 0, list(range(args.prompt_len)), params, 0)
        start = time.perf_counter()
        slots = capture.slot_mapping(ScheduledBatch([seq], [args.prompt_len]))
        torch.tensor(slots, dtype=torch.int64)
        capture.end(0)
        times.append(time.perf_counter() - start)
    emit({"commit": git_commit(), "prompt_len": args.prompt_len, "pool_slots": pool.num_slots,
          "median_ms": statistics.median(times) * 1e3, "evictions": pool.drops},
         args.out, "capture_bookkeeping")


if __name__ == "__main__":
    main()
