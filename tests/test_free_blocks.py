"""store.free_blocks.FreeBlocks: runs of consecutive blocks where they exist, oldest blocks otherwise."""
import pytest

from store.free_blocks import FreeBlocks


def test_fresh_blocks_come_in_runs_and_growth_continues_the_run():
    free = FreeBlocks(16)
    a = free.take(4)
    assert a == [0, 1, 2, 3]
    b = free.take(3)
    assert b == [4, 5, 6]
    assert free.take(2, after=a[-1]) == [7, 8]                  # 4, 5 are taken: the next run instead
    assert len(free) == 7


def test_growth_takes_the_blocks_right_after_when_free():
    free = FreeBlocks(16)
    a = free.take(2)                                            # 0, 1
    free.take(2)                                                # 2, 3
    for block in (2, 3):
        free.put(block)
    assert free.take(2, after=a[-1]) == [2, 3]                  # the record stays one run


def test_a_run_is_found_among_fragments():
    free = FreeBlocks(12)
    taken = free.take(12)
    for block in (9, 0, 2, 5, 6, 7, 11):                        # free in a scattered order
        free.put(block)
    assert free.take(3) == [5, 6, 7]                            # the one run of 3
    assert len(free) == 4
    assert sorted(free.take(4)) == [0, 2, 9, 11]                # no run of 4: oldest free blocks
    assert len(free) == 0 and len(taken) == 12


def test_no_block_is_handed_out_twice_through_stale_entries():
    free = FreeBlocks(8)
    free.take(8)
    for block in range(8):
        free.put(block)
    handed = []
    for _ in range(50):                                         # churn: runs taken out of FIFO order
        handed = free.take(3) + free.take(2, after=None)
        assert len(set(handed)) == 5
        for block in reversed(handed):
            free.put(block)
        assert len(free) == 8 and sorted(free) == list(range(8))
    with pytest.raises(ValueError):
        free.take(9)


def test_put_of_a_free_block_is_ignored():
    free = FreeBlocks(4)
    free.put(1)
    assert len(free) == 4 and sorted(free.take(4)) == [0, 1, 2, 3]
