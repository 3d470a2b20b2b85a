"""The host tier's memory: one allocation made when the pool is built (pinned on CUDA), handed out
as ranges of elements, first fit over a free list kept sorted by offset and coalesced.

Why not a tensor per demoted record: pinning memory (cudaHostAlloc) on the serving thread takes
milliseconds, and torch's pinned caching allocator rounds each block up to a power of two, so up to
twice the budget could end up pinned. Here the budget is exactly what is pinned, once, at start-up.
A freed range may be handed out again at once: every copy into or out of the tier runs on the host
tier's one side stream (store/host_tier.py), so a later copy into a range runs after earlier copies
out of it."""
from __future__ import annotations

import bisect

import torch


class HostArena:
    def __init__(self, capacity: int, dtype: torch.dtype, pin: bool):
        """`capacity`: elements of `dtype`."""
        self.capacity = capacity
        self.storage = torch.empty(capacity, dtype=dtype, pin_memory=pin and capacity > 0)   # [capacity]
        self._starts: list[int] = [0] if capacity else []      # free ranges, sorted by start ...
        self._sizes: list[int] = [capacity] if capacity else []  # ... and their sizes

    @property
    def free_elements(self) -> int:
        return sum(self._sizes)

    @property
    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    def alloc(self, count: int) -> torch.Tensor | None:
        """A [count] view of free elements (first fit), or None when no free range is that long."""
        if count <= 0:
            return self.storage[:0]
        for i, size in enumerate(self._sizes):
            if size >= count:
                start = self._starts[i]
                if size == count:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i], self._sizes[i] = start + count, size - count
                return self.storage[start:start + count]
        return None

    def free(self, start: int, count: int) -> None:
        """Give back the range of `count` elements at `start` (a view's `storage_offset()`) that `alloc`
        handed out."""
        if count <= 0:
            return
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._sizes.insert(i, count)
        if i + 1 < len(self._starts) and start + count == self._starts[i + 1]:     # joins the next range
            self._sizes[i] += self._sizes.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == start:            # joins the previous one
            self._sizes[i - 1] += self._sizes.pop(i)
            self._starts.pop(i)
