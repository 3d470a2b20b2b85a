"""The host tier's arena (store/host_arena.py): first fit, coalescing, exact reuse of freed ranges."""
import random

import torch

from store.host_arena import HostArena


def test_first_fit_and_coalescing():
    arena = HostArena(10, torch.float32, pin=False)
    a, b, c = arena.alloc(3), arena.alloc(3), arena.alloc(4)
    assert [v.storage_offset() for v in (a, b, c)] == [0, 3, 6] and arena.alloc(1) is None
    arena.free(a.storage_offset(), 3)
    arena.free(c.storage_offset(), 4)
    assert arena.free_elements == 7 and arena.largest_free == 4 and arena.alloc(5) is None
    arena.free(b.storage_offset(), 3)                     # joins both neighbours: one range again
    assert arena.largest_free == 10
    d = arena.alloc(10)
    d.copy_(torch.arange(10.0))
    assert torch.equal(arena.storage, torch.arange(10.0))


def test_random_allocations_never_overlap_and_all_come_back():
    rng = random.Random(5)
    arena = HostArena(1000, torch.float32, pin=False)
    held = []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            start, count = held.pop(rng.randrange(len(held)))
            arena.free(start, count)
        else:
            count = rng.randint(1, 120)
            view = arena.alloc(count)
            if view is None:
                assert arena.largest_free < count
                continue
            held.append((view.storage_offset(), count))
        ranges = sorted(held)
        assert all(s1 + c1 <= s2 for (s1, c1), (s2, _) in zip(ranges, ranges[1:]))
        assert arena.free_elements == 1000 - sum(c for _, c in held)
    for start, count in held:
        arena.free(start, count)
    assert arena.largest_free == 1000
