"""CPU tests of the paged activation pool: layout, blocks, slot mapping, capture, versions, budgets
(eviction, tiers and pins: tests/test_pool_eviction.py)."""
import pytest
import torch

from common.errors import AlchemistError, ConfigError, ConflictError
from store.activation_pool import ActivationMissingError, ActivationPool, PoolLayout
from tests.pool_helpers import BPT, BS, LAYOUT, assert_gathers, capture, check_invariants, make_pool


def test_layout_sizes_and_buffers():
    pool = make_pool(num_blocks=4)
    assert BPT == 80 and LAYOUT.bytes_per_layer_row == 40
    assert pool.num_slots == 16 and pool.scratch_slot == 16 and pool.num_blocks == 4
    assert pool.buffer(1, "down").shape == (17, 5) and pool.buffer(0, "k").dtype == torch.float32
    assert (pool.num_slots + 1) * BPT <= pool.budget_bytes
    with pytest.raises(AlchemistError):
        pool.buffer(2, "q")


def test_grouped_kinds_share_one_buffer_and_gather_as_one():
    pool = make_pool(num_blocks=4)
    assert LAYOUT.groups == (("q", "k"), ("down",))
    group = pool.group_buffer(0, ("q", "k"))                                   # [17, 3 + 2]
    assert group.shape == (17, 5) and group.is_contiguous()
    assert pool.buffer(0, "q").data_ptr() == group.data_ptr()                  # q: columns 0..2
    assert pool.buffer(0, "k").data_ptr() == group[:, 3:].data_ptr()           # k: columns 3..4
    assert pool.group_buffer(0, ("k", "q")) is None and pool.group_buffer(0, ("q",)) is None
    pool.reserve("a", 6)
    written = capture(pool, "a", 0, 6, seed=3)
    slots = pool.device_slots("a")
    both = pool.gather_slots(1, ("q", "k"), slots)                             # one gather: [6, 5]
    assert torch.equal(both, torch.cat([written[(1, "q")], written[(1, "k")]], dim=1))
    across = pool.gather_slots(1, ("k", "down"), slots)                        # no group: a cat
    assert torch.equal(across, torch.cat([written[(1, "k")], written[(1, "down")]], dim=1))
    assert torch.equal(pool.gather_slots(0, ("down",), slots), written[(0, "down")])
    group.index_copy_(0, slots[:2], torch.zeros(2, 5))                         # a packed write ...
    assert torch.equal(pool.gather("a", 0, "k", slice(0, 2)), torch.zeros(2, 2))   # ... is each kind's
    for bad in ((("q", "q"),), (("q", "x"),), (("q",), ("q", "k"))):
        with pytest.raises(ConfigError, match="groups"):
            PoolLayout(num_layers=1, dims={"q": 3, "k": 2}, groups=bad)


def test_reserve_release_and_free_list():
    pool = make_pool(num_blocks=4)
    a = pool.reserve("a", 5)                       # 2 blocks
    b = pool.reserve("b", 4)                       # 1 block
    assert len(a.blocks) == 2 and len(b.blocks) == 1 and pool.num_free_blocks == 1
    assert set(a.blocks).isdisjoint(b.blocks) and pool.get("a") is a
    with pytest.raises(ConflictError):
        pool.reserve("a", 1)
    assert pool.release("a") and not pool.release("a") and pool.get("a") is None
    assert pool.num_free_blocks == 3
    assert len(pool.reserve("c", 12).blocks) == 3
    assert pool.reserve("empty", 0).blocks == []
    check_invariants(pool)
    assert pool.stats()["bytes"]["device"] == 4 * BS * BPT


def test_slot_mapping_and_scratch_beyond_reservation():
    pool = make_pool(num_blocks=4)
    pool.reserve("x", 1)
    rec = pool.reserve("a", 6)
    b0, b1 = rec.blocks
    expected = [b0 * BS + i for i in range(4)] + [b1 * BS, b1 * BS + 1] + [pool.scratch_slot] * 3
    assert pool.slot_mapping("a", 0, 9) == expected
    assert pool.slot_mapping("a", 3, 2) == expected[3:5]
    assert pool.slot_mapping("a", 7, 0) == []
    with pytest.raises(ActivationMissingError):
        pool.slot_mapping("nope", 0, 1)


def test_slot_run_is_the_first_slot_only_when_slot_mapping_is_one_run():
    pool = make_pool(num_blocks=6)
    pool.reserve("x", 1)                                   # block 0 taken: "a" gets blocks 1, 2
    pool.reserve("a", 2 * BS)
    pool.reserve("y", 1)
    pool.extend("a", 3 * BS)                               # block 4 follows block 3 ("y"): not a run
    assert pool.get("a").blocks == [1, 2, 4]
    seen = set()
    for start, count in ((0, 2 * BS), (1, BS), (BS + 1, BS - 1), (2 * BS, BS), (0, 3 * BS), (BS, BS + 1),
                         (0, 3 * BS + 1), (0, 0)):
        slots = pool.slot_mapping("a", start, count)
        one_run = (count > 0 and pool.scratch_slot not in slots
                   and slots == list(range(slots[0], slots[0] + count)))
        assert pool.slot_run("a", start, count) == (slots[0] if one_run else None), (start, count)
        seen.add(one_run)
    assert seen == {True, False}


def test_index_copy_then_gather_returns_written_rows():
    pool = make_pool(num_blocks=4)
    pool.reserve("other", 3)
    pool.reserve("a", 7)
    first = capture(pool, "a", 0, 5, seed=1)        # prefill chunk
    second = capture(pool, "a", 5, 2, seed=2)       # next chunk
    written = {k: torch.cat([first[k], second[k]]) for k in first}
    assert pool.get("a").captured == 7
    assert_gathers(pool, "a", written)
    assert_gathers(pool, "a", {k: v[2:6] for k, v in written.items()}, slice(2, 6))
    assert_gathers(pool, "a", {k: v[:3] for k, v in written.items()}, slice(None, 3))
    with pytest.raises(ActivationMissingError):
        pool.gather("a", 0, "q", slice(0, 8))        # row 7 was never captured
    with pytest.raises(AlchemistError):
        pool.gather("a", 0, "q", slice(0, 4, 2))


def test_rows_beyond_reservation_go_to_scratch():
    pool = make_pool(num_blocks=4)
    pool.reserve("a", 2)
    written = capture(pool, "a", 0, 3)               # third row lands in scratch
    assert pool.get("a").captured == 2               # clamped to the reservation
    assert_gathers(pool, "a", {k: v[:2] for k, v in written.items()})
    assert torch.equal(pool.buffer(0, "q")[pool.scratch_slot], written[(0, "q")][2])


def test_extend_grows_reservation_and_keeps_rows():
    pool = make_pool(num_blocks=3)
    pool.reserve("a", 3)
    first = capture(pool, "a", 0, 3, version=1)
    assert pool.extend("a", 4) and len(pool.get("a").blocks) == 1    # still in block 0
    assert pool.extend("a", 9) and len(pool.get("a").blocks) == 3
    assert pool.extend("a", 5)                                        # shrinking is a no-op
    second = capture(pool, "a", 3, 6, version=1)
    assert_gathers(pool, "a", {k: torch.cat([first[k], second[k]]) for k in first})
    assert not pool.extend("a", 13)                                   # no 4th block anywhere
    assert pool.get("a").capture_stopped and not pool.extend("a", 9)
    assert pool.get("a").captured == 9
    check_invariants(pool)


def test_failed_extend_stops_capture_even_if_room_appears():
    pool = make_pool(num_blocks=2)
    pool.reserve("a", 4)
    pool.reserve("b", 4)
    pool.pin("b")
    capture(pool, "a", 0, 4)
    assert not pool.extend("a", 5)
    pool.release("b")
    assert not pool.extend("a", 5)
    assert pool.slot_mapping("a", 4, 1) == [pool.scratch_slot]
    assert pool.mark_captured("a", 5, 0) == 4


def test_mark_captured_tracks_version_changes():
    pool = make_pool(num_blocks=4)
    pool.reserve("a", 10)
    capture(pool, "a", 0, 4, version=3)
    capture(pool, "a", 4, 1, version=3)
    capture(pool, "a", 5, 2, version=4)              # adapter published mid-sequence
    assert pool.mark_captured("a", 6, 9) == 7        # already captured: no-op
    capture(pool, "a", 7, 1, version=5)
    assert pool.get("a").versions == [3] * 5 + [4] * 2 + [5]


def test_config_error_for_too_small_budget():
    with pytest.raises(ConfigError, match="raise the activation pool budget"):
        ActivationPool(LAYOUT, BS * BPT, block_size=BS)          # no room for the scratch row
    with pytest.raises(ConfigError):
        PoolLayout(num_layers=0, dims={"q": 4}, dtype=torch.float32)
    pool = ActivationPool(LAYOUT, (2 * BS + 3) * BPT, block_size=BS)
    assert pool.num_slots == 2 * BS                               # rounded down to whole blocks


def test_a_finished_record_with_nothing_left_is_forgotten():
    """Each answer nobody rated leaves no trace once its rows are gone: the pool's records stay bounded
    however long the server serves (they used to stay forever, tier "dropped")."""
    from tests.pool_helpers import capture, make_pool
    pool = make_pool(num_blocks=2)
    for i in range(50):
        key = (f"r{i}", 0)
        assert pool.reserve(key, 4) is not None          # one block each: older records are dropped
        capture(pool, key, 0, 4)
        pool.finish(key)
    assert len(pool._records) <= 3
    assert pool.stats()["records"]["dropped"] <= 1
    assert pool.get(("r49", 0)).tier == "device"


def test_a_running_or_rated_record_stays_when_dropped():
    from tests.pool_helpers import capture, make_pool
    pool = make_pool(num_blocks=2)
    pool.reserve(("running", 0), 4)
    pool.reserve(("rated", 0), 4)
    capture(pool, ("rated", 0), 0, 4)
    pool.finish(("rated", 0))
    pool.pin(("rated", 0))
    pool.demote(("running", 0), ("q", "k", "down"), "dropped")
    pool.reserve(("next", 0), 4)                          # a purge: the running record is not finished
    assert pool.get(("running", 0)).tier == "dropped"
    assert not pool.extend(("running", 0), 8)             # the engine may still ask: no error
    pool.demote(("rated", 0), ("q", "k", "down"), "dropped")
    pool.reserve(("other", 0), 0)
    assert pool.get(("rated", 0)) is not None             # pinned: the trainer releases it
    pool.finish(("running", 0))
    assert pool.get(("running", 0)) is None
