"""Free blocks of the activation pool, handed out in runs of consecutive blocks where one exists.

A record whose blocks are consecutive has its rows in one run of slots; a prompt step that records
only such rows lets the projections write their outputs straight into the pool (no copy, DESIGN §3).
`take(count, after)` prefers the blocks right after `after` (a record growing by a chunk), then the
first run of `count` free blocks among the oldest `SCAN_LIMIT` free ones, then the oldest blocks.
Blocks taken out of order stay in the FIFO as stale entries, skipped when reached.
"""
from __future__ import annotations

from collections import deque

SCAN_LIMIT = 4096           # free blocks looked at for the start of a run (bounded host time)


class FreeBlocks:
    def __init__(self, num_blocks: int):
        self._order: deque[int] = deque(range(num_blocks))   # oldest first; may hold stale entries
        self._free: set[int] = set(range(num_blocks))

    def __len__(self) -> int:
        return len(self._free)

    def __iter__(self):
        return iter(sorted(self._free))

    def put(self, block: int) -> None:
        if block not in self._free:
            self._free.add(block)
            self._order.append(block)

    def take(self, count: int, after: int | None = None) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"{count} blocks asked, {len(self._free)} free")
        run = self._run(count, after)
        if run is None:
            return [self._pop_oldest() for _ in range(count)]
        self._free.difference_update(run)
        if len(self._order) > 2 * len(self._free) + 64:         # drop stale entries now and then
            self._order = deque(b for b in self._order if b in self._free)
        return run

    def _run(self, count: int, after: int | None) -> list[int] | None:
        if count == 0:
            return []
        if after is not None and self._free_from(after + 1, count):
            return list(range(after + 1, after + 1 + count))
        for i, block in enumerate(self._order):
            if i >= SCAN_LIMIT:
                break
            if block in self._free and block - 1 not in self._free and self._free_from(block, count):
                return list(range(block, block + count))
        return None

    def _free_from(self, first: int, count: int) -> bool:
        return all(b in self._free for b in range(first, first + count))

    def _pop_oldest(self) -> int:
        while True:
            block = self._order.popleft()
            if block in self._free:
                self._free.discard(block)
                return block
