"""Row scatter speed on one GPU, side by side (engine/rows.py): `index_copy_` of bf16 rows vs the same
rows as int64 words, for the pool groups of the 8B shape (q|k|v 6144 wide, gate|up 28672) and a KV row
(8 x 128), 1024 rows into a buffer of 12k slots in a shuffled order. Prints one JSON line.

    python -m benchmarks.gpu_row_copy --out DIR
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import emit, event_time, git_commit
from engine.rows import as_words


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=12288)
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "commit": git_commit(), "rows": args.rows}
    index = torch.randperm(args.slots, device="cuda")[:args.rows]
    for name, width in (("qkv", 6144), ("gate_up", 28672), ("kv_row", 1024)):
        dst = torch.empty(args.slots, width, dtype=torch.bfloat16, device="cuda")
        src = torch.randn(args.rows, width, dtype=torch.bfloat16, device="cuda")
        elementwise = event_time(lambda: dst.index_copy_(0, index, src)) * 1e3
        words = event_time(lambda: as_words(dst).index_copy_(0, index, as_words(src))) * 1e3
        contiguous = event_time(lambda: dst[:args.rows].copy_(src)) * 1e3
        moved = 2 * src.numel() * src.element_size()                    # read + write, bytes
        result[name] = {"index_copy_bf16_ms": elementwise, "index_copy_words_ms": words,
                        "slice_copy_ms": contiguous, "speedup_words": elementwise / words,
                        "words_TB_s": moved / words / 1e9}
    emit(result, args.out, "gpu_row_copy")


if __name__ == "__main__":
    main()
