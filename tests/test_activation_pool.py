"""CPU tests of the paged activation pool: blocks, slot mapping, capture, LRU tiers, pins, budgets."""
import random

import pytest
import torch

from engine.errors import AlchemistError, ConfigError, ConflictError
from store.activation_pool import (ActivationMissingError, ActivationPool, PoolLayout,
                                   fetch_beats_recompute)

BS = 4
LAYOUT = PoolLayout(num_layers=2, dims={"q": 3, "k": 2, "down": 5}, dtype=torch.float32,
                    groups=(("q", "k"),))     # q and k side by side in one buffer, as q|k|v on CUDA
BPT = LAYOUT.bytes_per_token                   # 2 layers * 10 floats * 4 bytes = 80


def make_pool(num_blocks=4, cpu_tokens=0, block_size=BS):
    """A pool whose device tier holds exactly `num_blocks` blocks (plus the scratch row)."""
    return ActivationPool(LAYOUT, (num_blocks * block_size + 1) * BPT, block_size=block_size,
                          cpu_budget_bytes=cpu_tokens * BPT)


def capture(pool, key, start, count, version=0, seed=0):
    """Write rows like the model does (one index_copy_ per layer and kind); returns them."""
    layout = pool.layout
    slots = torch.tensor(pool.slot_mapping(key, start, count), dtype=torch.long,
                         device=layout.device)                               # [count]
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for layer in range(layout.num_layers):
        for kind, dim in layout.dims.items():
            rows = torch.randn(count, dim, generator=gen).to(layout.device, layout.dtype)  # [count, dim]
            pool.buffer(layer, kind).index_copy_(0, slots, rows)
            written[(layer, kind)] = rows
    pool.mark_captured(key, start + count, version)
    return written


def assert_gathers(pool, key, written, positions=None):
    for (layer, kind), rows in written.items():
        assert torch.equal(pool.gather(key, layer, kind, positions), rows)


def check_invariants(pool):
    owned = [b for r in pool._records.values() for b in r.blocks]
    assert len(owned) == len(set(owned))
    assert sorted(owned + list(pool._free_blocks)) == list(range(pool.num_blocks))
    stats = pool.stats()
    assert stats["bytes"]["device"] <= pool.budget_bytes
    assert stats["bytes"]["cpu"] <= pool.cpu_budget_bytes
    cpu_bytes = sum(r.captured * BPT for r in pool._records.values() if r.tier == "cpu")
    assert stats["bytes"]["cpu"] == cpu_bytes
    for r in pool._records.values():
        assert len(r.versions) == r.captured <= r.num_tokens
        assert (r.tier == "device") == bool(r.blocks) or r.num_tokens == 0
        assert (r.tier == "cpu") == (r.cpu_rows is not None)
        if r.tier == "device":
            assert len(r.blocks) == -(-r.num_tokens // pool.block_size)


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


def test_lru_eviction_order_and_touch():
    pool = make_pool(num_blocks=3)
    for key in "abc":
        pool.reserve(key, 4)
    pool.touch("a")                                  # LRU order now b, c, a
    pool.reserve("d", 4)
    assert pool.get("b").tier == "dropped" and pool.get("c").tier == "device"
    pool.extend("c", 5)                              # needs a block: evicts a (c and d are newer)
    assert pool.get("a").tier == "dropped" and pool.get("c").tier == "device"
    assert pool.stats()["drops"] == 2 and pool.stats()["records"]["dropped"] == 2
    check_invariants(pool)


def test_eviction_to_cpu_tier_keeps_exact_data():
    pool = make_pool(num_blocks=2, cpu_tokens=8)
    pool.reserve("a", 6)
    written = capture(pool, "a", 0, 5, version=2)
    pool.reserve("b", 8)                             # evicts a to the CPU tier
    rec = pool.get("a")
    assert rec.tier == "cpu" and rec.blocks == [] and rec.captured == 5
    capture(pool, "b", 0, 8, seed=9)                 # overwrites a's old slots
    assert_gathers(pool, "a", written)
    assert_gathers(pool, "a", {k: v[1:4] for k, v in written.items()}, slice(1, 4))
    stats = pool.stats()
    assert stats["evictions_to_cpu"] == 1 and stats["bytes"]["cpu"] == 5 * BPT
    assert stats["records"] == {"device": 1, "cpu": 1, "dropped": 0}
    assert not pool.extend("a", 7) and pool.slot_mapping("a", 0, 2) == [pool.scratch_slot] * 2
    assert pool.mark_captured("a", 6, 2) == 5
    pool.release("a")
    assert pool.stats()["bytes"]["cpu"] == 0
    check_invariants(pool)


def test_cpu_tier_full_drops_older_cpu_records_then_evictee():
    pool = make_pool(num_blocks=2, cpu_tokens=6)
    for key, n in (("a", 4), ("b", 4)):
        pool.reserve(key, n)
        capture(pool, key, 0, n)
    pool.reserve("c", 4)                             # a -> cpu (4 of 6 tokens)
    pool.reserve("d", 4)                             # b -> cpu needs room: drops a
    assert [pool.get(k).tier for k in "abcd"] == ["dropped", "cpu", "device", "device"]
    pool.pin("b")
    capture(pool, "c", 0, 4)
    pool.touch("d")                                  # LRU order: c, d
    pool.reserve("e", 4)                             # c can't fit beside pinned b: dropped
    assert pool.get("c").tier == "dropped" and pool.get("b").tier == "cpu"
    check_invariants(pool)


def test_drop_without_cpu_budget_then_gather_raises():
    pool = make_pool(num_blocks=1)
    pool.reserve("a", 4)
    capture(pool, "a", 0, 4)
    pool.reserve("b", 4)
    assert pool.get("a").tier == "dropped"
    with pytest.raises(ActivationMissingError) as err:
        pool.gather("a", 0, "q")
    assert err.value.status_code == 404
    with pytest.raises(ActivationMissingError):
        pool.gather("never", 0, "q")


def test_pin_if_present_pins_held_records_and_ignores_others():
    pool = make_pool(num_blocks=2)
    pool.reserve("a", 4)
    assert pool.pin_if_present("a") and pool.get("a").pinned
    assert not pool.pin_if_present("gone") and pool.get("gone") is None     # no record made, no error
    pool.reserve("b", 4)
    pool.reserve("c", 4)                        # full: evicts the unpinned "b", not the older pinned "a"
    assert pool.get("a").tier == "device" and pool.get("b").tier == "dropped"


def test_pinned_never_evicted_and_reserve_none_when_full():
    pool = make_pool(num_blocks=3)
    for key in "abc":
        pool.reserve(key, 4)
        pool.pin(key)
    before = pool.stats()
    assert pool.reserve("d", 1) is None and pool.get("d") is None
    assert pool.stats() == before
    pool.unpin("b")
    assert pool.reserve("d", 8) is None              # b alone frees one block: nothing changes
    assert pool.get("b").tier == "device"
    assert pool.reserve("d", 4) is not None and pool.get("b").tier == "dropped"
    assert all(pool.get(k).tier == "device" for k in "acd")


def test_config_error_for_too_small_budget():
    with pytest.raises(ConfigError, match="raise the activation pool budget"):
        ActivationPool(LAYOUT, BS * BPT, block_size=BS)          # no room for the scratch row
    with pytest.raises(ConfigError):
        PoolLayout(num_layers=0, dims={"q": 4}, dtype=torch.float32)
    pool = ActivationPool(LAYOUT, (2 * BS + 3) * BPT, block_size=BS)
    assert pool.num_slots == 2 * BS                               # rounded down to whole blocks


def test_hedging_helper():
    # 1000 rows * 40 B over 1 GB/s = 40 us; recompute 1000 * 1e6 flops at 1e12/s = 1 ms
    assert fetch_beats_recompute(1000, 40, 1e9, 1e12, 1e6)
    assert not fetch_beats_recompute(1000, 40_000, 1e9, 1e12, 1e3)
    assert fetch_beats_recompute(0, 40, 1e9, 1e12, 1e6)
    with pytest.raises(AlchemistError):
        fetch_beats_recompute(10, 40, 0, 1e12, 1e6)
    pool = make_pool()
    assert pool.would_fetch_beat_recompute(1000, 1e9, 1e12, 1e6)
    assert not pool.would_fetch_beat_recompute(1000, 1e9, 1e12, 1e1)


def evictable_blocks(pool, exclude=None):
    return pool.num_free_blocks + sum(len(r.blocks) for r in pool._records.values()
                                      if r.tier == "device" and not r.pinned and r.key != exclude)


def test_random_stress_keeps_invariants():
    rng = random.Random(1234)
    pool = make_pool(num_blocks=8, cpu_tokens=20)
    data, next_key = {}, 0
    for _ in range(800):
        keys = list(pool._records)
        pinned_tiers = {k: r.tier for k, r in pool._records.items() if r.pinned}
        op = rng.random()
        if op < 0.35 or not keys:
            key, next_key = next_key, next_key + 1
            num_tokens = rng.randint(0, 14)
            room = evictable_blocks(pool)
            rec = pool.reserve(key, num_tokens)
            assert (rec is None) == (room < -(-num_tokens // BS))
            if rec is not None and num_tokens:
                data[key] = capture(pool, key, 0, rng.randint(0, num_tokens), seed=key)
        else:
            key = rng.choice(keys)
            if op < 0.55:
                pool.extend(key, pool.get(key).num_tokens + rng.randint(1, 6))
            elif op < 0.7:
                pool.pin(key)
            elif op < 0.85:
                pool.unpin(key)
            else:
                pool.release(key)
                data.pop(key, None)
                pinned_tiers.pop(key, None)
        check_invariants(pool)
        assert all(pool.get(k).tier == tier for k, tier in pinned_tiers.items())
        for key, rec in list(pool._records.items()):   # gather reorders the LRU
            if rec.tier != "dropped" and rec.captured and rng.random() < 0.1:
                assert_gathers(pool, key, {k: v[:rec.captured] for k, v in data[key].items()})
    stats = pool.stats()
    assert stats["evictions_to_cpu"] > 0 and stats["drops"] > 0
    assert stats["records"]["cpu"] + stats["records"]["device"] > 0


@pytest.mark.gpu
def test_cuda_tiers_roundtrip_exact_data():
    layout = PoolLayout(num_layers=3, dims={"q": 64, "k": 16, "gate": 96}, dtype=torch.bfloat16,
                        device=torch.device("cuda"), groups=(("q", "k"),))
    pool = ActivationPool(layout, (4 * BS + 1) * layout.bytes_per_token, block_size=BS,
                          cpu_budget_bytes=64 * layout.bytes_per_token)
    written = {}
    for key in range(12):                            # each new record evicts an older one
        pool.reserve(key, 8)
        written[key] = capture(pool, key, 0, 8, seed=key)
        assert pool.stats()["bytes"]["device"] <= pool.budget_bytes
    tiers = [pool.get(key).tier for key in range(12)]   # the CPU tier holds 8 records of 8 rows
    assert tiers == ["dropped"] * 2 + ["cpu"] * 8 + ["device"] * 2
    for key, rows in list(written.items())[2:]:
        rec = pool.get(key)
        if rec.tier == "cpu":
            assert all(t.is_pinned() for t in rec.cpu_rows.values())
        for (layer, kind), expected in rows.items():
            got = pool.gather(key, layer, kind, slice(1, 7))
            assert got.device.type == "cuda" and torch.equal(got, expected[1:7])
