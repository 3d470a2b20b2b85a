"""Issue 18: the activation pool's tiers kind by kind: the value order of demotion, the feedback
window, explicit demotion, tier round-trips of exact rows, per-kind stats, and a training step's
reads of a batch whose records are spread over the tiers (store/pool_reader.py)."""
import time

import pytest
import torch
from transformers import LlamaConfig

from common.errors import InvalidRequestError
from store.activation_pool import ActivationPool
from store.pool_layout import PoolLayout
from store.pool_reader import BatchRows, Span
from tests.pool_helpers import BPT, LAYOUT, assert_gathers, capture, check_invariants, make_pool

TIERS = lambda pool, key: [pool.get(key).tier_of(kind) for kind in ("q", "k", "down")]


def test_demotion_order_at_the_8b_shape_is_gate_up_then_qkv_then_o_then_down():
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=32)
    layout = PoolLayout.for_model(config, torch.bfloat16, torch.device("cpu"))
    assert layout.input_dims == {"q": 4096, "k": 4096, "v": 4096, "o": 4096, "gate": 4096, "up": 4096,
                                 "down": 14336}
    assert layout.demotion_groups == (("gate", "up"), ("q", "k", "v"), ("o",), ("down",))
    assert layout.demotion_order[-1] == "down"
    down_share = layout.kind_bytes("down", 1) / layout.bytes_per_token
    assert down_share == 4096 / (3 * 4096 + 2 * 1024 + 2 * 14336)         # ~9.5% of a token's bytes


def test_tier_round_trip_device_host_device_gives_the_same_rows():
    pool = make_pool(num_blocks=4, cpu_tokens=16)
    pool.reserve("a", 7)
    written = capture(pool, "a", 0, 7)
    on_device = {(layer, kind): pool.gather("a", layer, kind) for layer, kind in written}
    pool.demote("a", ("q", "k", "down"), "cpu")
    record = pool.get("a")
    assert record.tier == "cpu" and record.blocks == [] and pool.num_free_blocks == 4
    for (layer, kind), rows in on_device.items():
        assert torch.equal(pool.gather("a", layer, kind), rows)
        assert torch.equal(pool.gather("a", layer, kind, slice(2, 5)), rows[2:5])
    stats = pool.stats()
    assert stats["bytes"]["cpu"] == 7 * BPT and stats["traffic_bytes"]["d2h"] == 7 * BPT
    assert stats["bytes_by_kind"]["cpu"] == {k: LAYOUT.kind_bytes(k, 7) for k in ("q", "k", "down")}
    assert stats["demoted_rows"] == {"device->cpu": {"q": 7, "k": 7, "down": 7}}
    check_invariants(pool)


def test_partial_demotion_keeps_the_device_rows_and_stops_capture():
    pool = make_pool(num_blocks=4, cpu_tokens=16)
    pool.reserve("a", 8)
    written = capture(pool, "a", 0, 6)
    pool.demote("a", ("down",), "cpu")
    pool.demote("a", ("k",), "dropped")
    assert TIERS(pool, "a") == ["device", "dropped", "cpu"] and pool.get("a").tier == "device"
    assert_gathers(pool, "a", written)                       # q from the device, down from the host
    assert not pool.extend("a", 12) and pool.get("a").capture_stopped
    stats = pool.stats()
    assert stats["bytes_by_kind"]["device"]["k"] == 0 and stats["bytes_by_kind"]["device"]["q"] > 0
    pool.demote("a", ("q",), "dropped")                      # nothing left on the device: blocks freed
    assert pool.get("a").tier == "cpu" and pool.num_free_blocks == 4
    pool.demote("a", ("down",), "dropped")
    assert pool.get("a").tier == "dropped" and pool.stats()["drops"] == 1
    check_invariants(pool)
    with pytest.raises(InvalidRequestError):
        pool.demote("a", ("mlp",), "dropped")
    with pytest.raises(InvalidRequestError):
        pool.demote("a", ("q",), "device")


def test_host_without_room_keeps_the_demoted_records_down_rows_only():
    """Room for 5 down rows of 2 layers and nothing else: the record's q|k rows are dropped, its down
    rows kept (most FLOPs per byte)."""
    down_bytes = LAYOUT.kind_bytes("down", 4)
    pool = ActivationPool(LAYOUT, 9 * BPT, block_size=4, cpu_budget_bytes=down_bytes)
    pool.reserve("a", 4)
    capture(pool, "a", 0, 4)
    pool.reserve("b", 8)                                     # a leaves the device
    assert TIERS(pool, "a") == ["dropped", "dropped", "cpu"]
    assert pool.stats()["bytes"]["cpu"] == down_bytes and pool.stats()["evictions_to_cpu"] == 1
    check_invariants(pool)


def test_a_fragmented_host_tier_keeps_the_most_valuable_kinds_that_fit():
    """The host arena has the bytes for a 2-row record but not in one piece for every kind: ranges
    go to `down` first, and the kind left without one is dropped (the books stay exact)."""
    pool = make_pool(num_blocks=2, cpu_tokens=8)
    for key in ("x", "y"):                                   # x, y fill the host arena exactly
        pool.reserve(key, 4)
        capture(pool, key, 0, 4)
        pool.demote(key, ("q", "k", "down"), "cpu")
    pool.demote("x", ("down",), "dropped")                   # frees 40 elements at x's down range
    pool.demote("y", ("k",), "dropped")                      # frees 16 elements elsewhere
    assert pool._host.arena.free_elements == 56 and pool._host.arena.largest_free == 40
    pool.reserve("z", 4)
    written = capture(pool, "z", 0, 4)                       # q 24 + k 16 + down 40 = 80 elements > 56
    pool.demote("z", ("q", "k", "down"), "cpu")              # the policy frees x's q|k first: 96 free
    check_invariants(pool)
    assert TIERS(pool, "z") == ["cpu", "cpu", "cpu"] and TIERS(pool, "x") == ["dropped"] * 3
    assert_gathers(pool, "z", written)
    pool.demote("y", ("q",), "dropped")                      # y keeps down only
    pool.reserve("w", 6)
    capture(pool, "w", 0, 6)                                 # 120 elements; 40 free
    pool.demote("w", ("q", "k", "down"), "cpu")              # z's q|k and w's go: 80 free, in two
    check_invariants(pool)                                   # ranges of 40: w's down (60) fits neither
    assert TIERS(pool, "z") == ["dropped", "dropped", "cpu"] and TIERS(pool, "w") == ["dropped"] * 3
    assert pool._host.arena.free_elements == 80 and pool._host.bytes_used == 80 * 4


def test_records_unrated_past_the_feedback_window_go_first_and_are_dropped():
    pool = make_pool(num_blocks=2, cpu_tokens=16, feedback_window_s=60.0)
    for key in "ab":
        pool.reserve(key, 4)
        capture(pool, key, 0, 4)
    pool.touch("a")                                          # LRU order: b, a
    pool.get("a").created = time.monotonic() - 61.0          # a's window has passed unrated
    pool.reserve("c", 4)
    capture(pool, "c", 0, 4)
    assert pool.get("a").tier == "dropped" and pool.get("b").tier == "device"
    assert pool.stats()["traffic_bytes"]["d2h"] == 0         # no copy for an expired record
    pool.get("b").pinned = True                              # rated: never expired, never moved
    pool.get("b").created = time.monotonic() - 61.0
    pool.reserve("d", 4)                                     # c goes (LRU), to the host: in its window
    assert pool.get("b").tier == "device" and pool.get("c").tier == "cpu"
    check_invariants(pool)


def test_host_tier_gives_up_expired_records_before_anything_else():
    pool = make_pool(num_blocks=1, cpu_tokens=8, feedback_window_s=60.0)
    for key in "xyz":
        pool.reserve(key, 4)
        capture(pool, key, 0, 4)
    # x, y on the host (8 tokens: full); z on the device
    assert [pool.get(k).tier for k in "xyz"] == ["cpu", "cpu", "device"]
    pool.touch("x")                                          # y is now the least recently used ...
    pool.get("x").created = time.monotonic() - 61.0          # ... but x is past its window
    pool.reserve("w", 4)                                     # z -> host: all of x goes, y keeps everything
    assert TIERS(pool, "x") == ["dropped"] * 3 and TIERS(pool, "y") == ["cpu"] * 3
    assert TIERS(pool, "z") == ["cpu"] * 3
    check_invariants(pool)


def test_batch_rows_read_every_tier_in_batch_order():
    """Three records, one on the device, one on the host, one with its q|k dropped: per (layer, kinds)
    the reader injects the rows still held, in batch order, and leaves the others fresh."""
    pool = make_pool(num_blocks=6, cpu_tokens=16)
    written = {}
    for key, n in (("dev", 3), ("host", 2), ("part", 4)):
        pool.reserve(key, n)
        written[key] = capture(pool, key, 0, n, seed=len(key))
    pool.demote("host", ("q", "k", "down"), "cpu")
    pool.demote("part", ("q", "k"), "dropped")
    spans = [Span("dev", 3, 1), Span("host", 2, 5), Span("part", 4, 7)]     # batch rows 0, 4, 11, 12 fresh
    reader = BatchRows(pool, spans, 13, torch.device("cpu"))
    stored_idx, fresh_idx, rows = reader.select(1, ("q", "k"))
    assert stored_idx.tolist() == [1, 2, 3, 5, 6] and fresh_idx.tolist() == [0, 4, 7, 8, 9, 10, 11, 12]
    expect = torch.cat([torch.cat([written[k][(1, "q")], written[k][(1, "k")]], dim=1) for k in ("dev", "host")])
    assert torch.equal(rows, expect)
    stored_idx, fresh_idx, rows = reader.select(0, ("down",))
    assert stored_idx.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10] and fresh_idx.tolist() == [0, 4, 11, 12]
    assert torch.equal(rows, torch.cat([written[k][(0, "down")] for k in ("dev", "host", "part")]))
    assert reader.counts["device/q"] == 3 and reader.counts["cpu/q"] == 2 and reader.counts["recomputed/q"] == 4
    host_units = reader.host_units()
    assert {(u.span, u.kind) for u in host_units} == {(1, "q"), (1, "k"), (1, "down")}
    reader.plan_recompute([u for u in host_units if u.layer == 1])          # the planner gave up layer 1
    assert reader.select(1, ("down",))[0].tolist() == [1, 2, 3, 7, 8, 9, 10]
    fresh_reader = BatchRows(pool, spans, 13, torch.device("cpu"))
    before = pool.stats()["traffic_bytes"]["h2d"]
    fresh_reader.prefetch_layer(0)                 # e.g. behind the previous step's backward
    copied = pool.stats()["traffic_bytes"]["h2d"] - before
    assert copied == 2 * BPT // 2                  # the host record's 2 rows, every kind, one layer of two
    assert torch.equal(fresh_reader.select(0, ("down",))[2][3:5], written["host"][(0, "down")])
    fresh_reader.select(0, ("q", "k"))
    assert pool.stats()["traffic_bytes"]["h2d"] - before == copied + 2 * BPT // 2   # + layer 1's, prefetched
    uniform = BatchRows(pool, spans, 13, torch.device("cpu"), uniform=True)   # only wholly held records
    assert uniform.stored_idx.tolist() == [1, 2, 3, 5, 6]
    assert torch.equal(uniform.rows(0, ("down",)), torch.cat([written[k][(0, "down")] for k in ("dev", "host")]))


@pytest.mark.gpu
def test_cuda_batch_rows_prefetch_host_rows_exactly():
    """On CUDA: host rows copied in on the side stream one layer ahead (PendingRows) and device rows
    gathered give exactly the captured rows, layer after layer, then again in reverse (a checkpointed
    backward: no prefetch)."""
    layout = PoolLayout(num_layers=4, dims={"q": 64, "k": 16, "down": 96}, dtype=torch.bfloat16,
                        device=torch.device("cuda"), groups=(("q", "k"),))
    pool = ActivationPool(layout, (8 * 4 + 1) * layout.bytes_per_token, block_size=4,
                          cpu_budget_bytes=32 * layout.bytes_per_token)
    written = {}
    for key, n in (("dev", 5), ("host", 7), ("part", 6)):
        pool.reserve(key, n)
        written[key] = capture(pool, key, 0, n, seed=len(key))
    pool.demote("host", ("q", "k", "down"), "cpu")
    pool.demote("part", ("down",), "cpu")
    spans = [Span("dev", 5, 0), Span("host", 7, 5), Span("part", 6, 12)]
    reader = BatchRows(pool, spans, 20, torch.device("cuda"))
    for layer in list(range(4)) + list(reversed(range(4))):
        for kinds in (("q", "k"), ("down",)):
            stored_idx, fresh_idx, rows = reader.select(layer, kinds)
            expect = torch.cat([torch.cat([written[k][(layer, kind)] for kind in kinds], dim=1)
                                for k in ("dev", "host", "part")])
            assert rows.device.type == "cuda" and torch.equal(rows, expect)
            assert stored_idx.tolist() == list(range(18)) and fresh_idx.tolist() == [18, 19]
    assert pool.stats()["traffic_bytes"]["h2d"] > 0 and not reader._prefetched     # none copied in vain


def test_the_retention_region_keeps_down_rows_on_the_device_then_passes_them_to_the_host():
    """Capture slots for 2 records of 4 rows, a retention region for 2 records' down rows: a record
    leaving the capture slots keeps its down rows on the device and sends q|k to the host; when the
    region is full its least recently used record's down rows move on to the host."""
    pool = ActivationPool(LAYOUT, 1100, block_size=4, cpu_budget_bytes=64 * BPT, retention_fraction=0.3)
    assert pool.num_blocks == 2 and pool._tiers.region.num_blocks == 2
    written = {}
    for key in "abcde":
        pool.reserve(key, 4)
        written[key] = capture(pool, key, 0, 4, seed=ord(key))
        check_invariants(pool)
    assert TIERS(pool, "a") == ["cpu", "cpu", "cpu"]                   # pushed out of the region by c
    assert TIERS(pool, "b") == TIERS(pool, "c") == ["cpu", "cpu", "retained"]
    assert pool.get("b").tier == "retained" and pool.get("d").tier == "device"
    for key in "abcde":
        assert_gathers(pool, key, written[key])
    stats = pool.stats()
    assert stats["records"] == {"device": 2, "retained": 2, "cpu": 1, "dropped": 0}
    assert stats["bytes_by_kind"]["retained"] == {"q": 0, "k": 0, "down": 2 * LAYOUT.kind_bytes("down", 4)}
    assert stats["demoted_rows"]["retained->cpu"] == {"down": 4}
    reader = BatchRows(pool, [Span("b", 4, 0), Span("d", 4, 4)], 8, torch.device("cpu"))
    stored_idx, fresh_idx, rows = reader.select(1, ("down",))
    assert stored_idx.tolist() == list(range(8)) and fresh_idx.tolist() == []
    assert torch.equal(rows, torch.cat([written["b"][(1, "down")], written["d"][(1, "down")]]))
    assert reader.counts["retained/down"] == 4 and reader.counts["device/down"] == 4
    pool.release("b")
    assert len(pool._tiers.region.free) == 1
    check_invariants(pool)
