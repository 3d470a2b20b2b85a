"""CPU tests of the activation pool's LRU eviction: the CPU tier, drops, pins, a random stress run
keeping the invariants; and (GPU) the tiers round-tripping exact data."""
import random

import pytest
import torch

from common.errors import AlchemistError
from store.activation_pool import ActivationMissingError, ActivationPool, PoolLayout
from store.pool_eviction import LRUEviction
from store.pool_layout import ActivationRecord
from tests.pool_helpers import (BPT, BS, LAYOUT, assert_gathers, capture, check_invariants, evictable_blocks,
                                make_pool)


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


def test_lru_policy_chooses_without_moving_anything():
    """The policy object alone: victims least recently used first, never pinned, excluded or off-tier
    records; None when the candidates cannot cover the shortfall."""
    records = [ActivationRecord("a", 8, [0, 1]), ActivationRecord("b", 4, [2], pinned=True),
               ActivationRecord("c", 4, [3]), ActivationRecord("d", 4, [4]),
               ActivationRecord("e", 4, tier="cpu", captured=3),
               ActivationRecord("f", 4, tier="cpu", captured=2)]
    lru = LRUEviction()
    assert [r.key for r in lru.device_victims(records, 3, exclude=None)] == ["a", "c"]
    assert [r.key for r in lru.device_victims(records, 2, exclude="a")] == ["c", "d"]
    assert lru.device_victims(records, 5, exclude=None) is None
    assert lru.host_victims(records, records[3], 0, BPT) == []              # it fits: nothing dropped
    assert lru.host_victims(records, records[3], BPT, BPT) is None          # e, f are newer than d
    incoming = ActivationRecord("g", 4)
    assert [r.key for r in lru.host_victims(records + [incoming], incoming, 4 * BPT, BPT)] == ["e", "f"]
    assert [r.tier for r in records] == ["device"] * 4 + ["cpu"] * 2      # choosing moved nothing


def test_pool_evicts_only_what_its_policy_chooses():
    class KeepAll:
        def device_victims(self, records, blocks_short, exclude):
            return None

        def host_victims(self, records, incoming, bytes_short, bytes_per_token):
            return None
    pool = ActivationPool(LAYOUT, (BS + 1) * BPT, block_size=BS, eviction=KeepAll())
    assert pool.reserve("a", BS) is not None and pool.reserve("b", BS) is None
    assert pool.get("a").tier == "device" and pool.stats()["drops"] == 0
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
    assert "recompute" in str(err.value)
    assert not isinstance(err.value, AlchemistError)         # an internal signal, not a client error
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
