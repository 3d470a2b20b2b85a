"""Row scatters as 8-byte words: `index_copy_` moves one element per GPU thread, so bf16 rows move in
2-byte pieces at a fraction of the memory bandwidth; the same rows viewed as int64 words move 4x
fewer, 4x wider elements. That pays for wide rows and loses for narrow ones (a KV row of 2 KiB), so
rows under MIN_WORD_ROW_BYTES keep `index_copy_` (benchmarks/gpu_row_copy.py; the H200's speed-up by
row width: BENCHMARKS.md "Capture overhead on one H200", the row scatter alone). Used wherever
serving or training scatters whole rows (KV cache, capture into the activation pool, injected rows of
a training forward)."""
from __future__ import annotations

import math

import torch

WORD = torch.int64
MIN_WORD_ROW_BYTES = 8192


def as_words(t: torch.Tensor) -> torch.Tensor | None:
    """t [N, ...] as [N, bytes_per_row / 8] int64 sharing its memory; None where the layout does not
    allow it (rows not viewable as one dimension, a row not a multiple of 8 bytes, misaligned)."""
    try:
        rows = t.view(t.shape[0], -1)                     # [N, elements per row], no copy
        return rows if rows.dtype == WORD else rows.view(WORD)
    except RuntimeError:
        return None


def copy_rows_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[index[i]] = src[i] for every i along dim 0 (what `dst.index_copy_(0, index, src)` does)."""
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    if dst.dtype == src.dtype and dst.shape[1:] == src.shape[1:] and row_bytes >= MIN_WORD_ROW_BYTES:
        wide_dst, wide_src = as_words(dst), as_words(src)
        if wide_dst is not None and wide_src is not None:
            wide_dst.index_copy_(0, index, wide_src)
            return dst
    return dst.index_copy_(0, index, src)
