"""Paged storage's one formula: position p of a sequence lives in row p % bs of its page
blocks[p // bs], i.e. slot blocks[p // bs] * bs + p % bs (the KV cache and the activation pool)."""
from __future__ import annotations


def paged_slots(blocks: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """Slots of positions [start, stop) of a sequence whose pages are `blocks`."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]
