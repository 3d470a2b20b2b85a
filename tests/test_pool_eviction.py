"""CPU tests of the activation pool's eviction: LRU order on the device, the CPU tier, drops, pins, a
random stress run keeping the invariants; and (GPU) the tiers round-tripping exact data. The value
order of demotion and the feedback window: tests/test_pool_tiers.py."""
import random

import pytest
import torch

from common.errors import AlchemistError
from store.activation_pool import ActivationMissingError, ActivationPool, PoolLayout
from store.pool_eviction import ValueEviction
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


def test_policy_chooses_without_moving_anything():
    """The policy object alone: device victims least recently used first, never pinned, excluded or
    off-tier records, None when the candidates cannot cover the shortfall; host drops by value group
    (q|k before down), least recently used first within a group, the incoming record ranked too."""
    records = [ActivationRecord("a", 8, [0, 1]), ActivationRecord("b", 4, [2], pinned=True),
               ActivationRecord("c", 4, [3]), ActivationRecord("d", 4, [4]),
               ActivationRecord("e", 4, tier="cpu", captured=3, last_used=1.0),
               ActivationRecord("f", 4, tier="cpu", captured=2, last_used=2.0)]
    policy = ValueEviction()
    assert [r.key for r in policy.device_victims(records, 3, exclude=None, now=0.0)] == ["a", "c"]
    assert [r.key for r in policy.device_victims(records, 2, exclude="a", now=0.0)] == ["c", "d"]
    assert policy.device_victims(records, 5, exclude=None, now=0.0) is None
    groups = LAYOUT.demotion_groups
    assert groups == (("q", "k"), ("down",))
    unit = lambda r, kinds: LAYOUT.kind_bytes(kinds[0], r.captured) * 0 + sum(
        LAYOUT.kind_bytes(k, r.captured) for k in kinds)
    incoming = ActivationRecord("g", 4, captured=4, last_used=3.0)
    assert policy.host_drops(records, incoming, ("q", "k", "down"), 0, unit, groups, 0.0) == []
    drops = policy.host_drops(records, incoming, ("q", "k", "down"), 1, unit, groups, 0.0)
    assert [(r.key, kinds) for r, kinds in drops] == [("e", ("q", "k"))]
    need = unit(records[4], ("q", "k")) + unit(records[5], ("q", "k")) + 1
    drops = policy.host_drops(records, incoming, ("q", "k", "down"), need, unit, groups, 0.0)
    assert [(r.key, kinds) for r, kinds in drops] == [("e", ("q", "k")), ("f", ("q", "k")), ("g", ("q", "k"))]
    assert [r.tier for r in records] == ["device"] * 4 + ["cpu"] * 2      # choosing moved nothing


def test_pool_evicts_only_what_its_policy_chooses():
    class KeepAll(ValueEviction):
        def device_victims(self, records, blocks_short, exclude, now):
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
    assert stats["records"] == {"device": 1, "retained": 0, "cpu": 1, "dropped": 0}
    assert not pool.extend("a", 7) and pool.slot_mapping("a", 0, 2) == [pool.scratch_slot] * 2
    assert pool.mark_captured("a", 6, 2) == 5
    pool.release("a")
    assert pool.stats()["bytes"]["cpu"] == 0
    check_invariants(pool)


def test_cpu_tier_full_drops_cheap_kinds_before_any_down_rows():
    """6 tokens of host room, records of 4: the second record to arrive does not push the first out:
    both keep their down rows (the most FLOPs per byte), the q|k rows of the older one go first."""
    pool = make_pool(num_blocks=2, cpu_tokens=6)
    for key, n in (("a", 4), ("b", 4)):
        pool.reserve(key, n)
        capture(pool, key, 0, n)
    pool.reserve("c", 4)                             # a -> cpu (4 of 6 tokens)
    pool.reserve("d", 4)                             # b -> cpu needs 2 tokens' room: a's q|k rows free it
    tiers = lambda key: [pool.get(key).tier_of(k) for k in ("q", "k", "down")]
    assert tiers("a") == ["dropped", "dropped", "cpu"] and tiers("b") == ["cpu"] * 3
    assert pool.stats()["bytes"]["cpu"] == 8 * BPT - LAYOUT.kind_bytes("q", 4) - LAYOUT.kind_bytes("k", 4)
    pool.pin("b")
    capture(pool, "c", 0, 4)
    pool.touch("d")                                  # LRU order: c, d
    pool.reserve("e", 4)                             # c -> cpu beside pinned b: c's q|k, then a's down go
    assert tiers("a") == ["dropped"] * 3 and pool.get("a").tier == "dropped"
    assert tiers("b") == ["cpu"] * 3 and tiers("c") == ["dropped", "dropped", "cpu"]
    assert pool.stats()["demoted_rows"]["cpu->dropped"] == {"q": 4, "k": 4, "down": 4}
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


@pytest.mark.parametrize("retained_tokens", [0, 12])
def test_random_stress_keeps_invariants(retained_tokens):
    rng = random.Random(1234)
    pool = make_pool(num_blocks=8, cpu_tokens=20, retained_tokens=retained_tokens)
    assert pool.num_blocks == 8
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
    if retained_tokens:                  # down rows went through the retention region on to the host
        assert {"device->retained", "retained->cpu"} <= set(stats["demoted_rows"]), stats


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
    assert tiers == ["cpu"] * 10 + ["device"] * 2     # 8 and 9 fit once 0-3 gave up their gate rows
    assert [pool.get(key).tier_of("gate") for key in range(10)] == ["dropped"] * 4 + ["cpu"] * 6
    for key, rows in list(written.items()):
        rec = pool.get(key)
        if rec.tier == "cpu":
            assert all(t.is_pinned() for t in rec.cpu_rows.values())
        for (layer, kind), expected in rows.items():
            if rec.tier_of(kind) == "dropped":
                continue
            got = pool.gather(key, layer, kind, slice(1, 7))
            assert got.device.type == "cuda" and torch.equal(got, expected[1:7])
