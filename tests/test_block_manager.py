"""Model-free tests of the paged KV block manager: refcounts, free list (LRU) and prefix caching."""
import itertools

import pytest

from engine.block_manager import BlockManager, chain_hash, root_hash
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4
_ids = itertools.count()


def make_seq(tokens, adapter_version=0):
    return Sequence(next(_ids), "r", 0, list(tokens), SamplingParams(), seed=0,
                    adapter_version=adapter_version)


def compute(bm, seq, upto=None):
    """Admit `seq` like the scheduler does, compute up to `upto` tokens and commit."""
    upto = seq.num_tokens if upto is None else upto
    bm.match_prefix(seq)
    bm.allocate(seq, upto)
    prev, seq.num_computed_tokens = seq.num_computed_tokens, upto
    bm.commit(seq, prev)
    return seq


def check_free_list(bm):
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert all(b.ref_count >= 0 for b in bm.blocks)
    for h, bid in bm.hash_to_block_id.items():
        assert bm.blocks[bid].hash == h


def test_blocks_needed_and_usage():
    bm = BlockManager(8, BS)
    assert [bm.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    assert bm.usage() == 0.0 and bm.num_free_blocks == 8
    s = make_seq(range(10))
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage() == pytest.approx(3 / 8)
    bm.free(s)
    assert bm.usage() == 0.0


def test_allocate_extend_free_refcount():
    bm = BlockManager(4, BS)
    s = make_seq(range(6))
    assert bm.can_allocate(s, 6)
    bm.allocate(s, 6)
    assert s.block_table == [0, 1]
    assert [bm.blocks[b].ref_count for b in s.block_table] == [1, 1]
    bm.allocate(s, 8)                       # still fits in two blocks: no-op
    assert s.block_table == [0, 1]
    bm.allocate(s, 9)
    assert s.block_table == [0, 1, 2] and bm.num_free_blocks == 1
    assert bm.can_allocate(s, 16) and not bm.can_allocate(s, 17)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 17)
    assert s.block_table == [0, 1, 2]       # a failed allocate takes nothing
    check_free_list(bm)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 4
    assert all(b.ref_count == 0 for b in bm.blocks)
    # freed in reverse: the tail block is evicted first, after the never-used block 3
    assert list(bm.free_block_ids) == [3, 2, 1, 0]
    check_free_list(bm)


def test_prefix_hit_shares_blocks_and_counts():
    bm = BlockManager(16, BS)
    a = compute(bm, make_seq(range(10)))
    assert a.num_cached_tokens == 0
    b = make_seq(list(range(10)) + [77, 78])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2]
    assert bm.blocks[a.block_table[2]].ref_count == 1
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 12, 8)
    bm.allocate(b, 12)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    check_free_list(bm)


def test_hash_chain_and_adapter_version():
    bm = BlockManager(16, BS)
    a = compute(bm, make_seq(range(12)))
    h0 = chain_hash(root_hash(0), (0, 1, 2, 3))
    assert bm.blocks[a.block_table[0]].hash == h0
    assert bm.blocks[a.block_table[1]].hash == chain_hash(h0, (4, 5, 6, 7))
    # same second block after a different first block: the chain does not match
    assert bm.match_prefix(make_seq([9, 9, 9, 9, 4, 5, 6, 7, 1])) == 0
    # same tokens under another adapter version: miss; same version: hit
    assert bm.match_prefix(make_seq(range(12), adapter_version=1)) == 0
    assert bm.match_prefix(make_seq(range(12), adapter_version=0)) == 8
    # divergence inside the second block: only the first block is shared
    assert bm.match_prefix(make_seq([0, 1, 2, 3, 4, 5, 99, 7, 8])) == 4


def test_partial_block_never_matched_and_one_token_left():
    bm = BlockManager(16, BS)
    a = compute(bm, make_seq(range(6)))
    assert bm.blocks[a.block_table[1]].hash is None          # partial block not registered
    assert bm.match_prefix(make_seq(list(range(6)) + [6, 7, 8])) == 4
    full = compute(bm, make_seq(range(100, 108)))             # two full blocks, all cached
    same = make_seq(range(100, 108))
    assert bm.match_prefix(same) == 4                         # last token still to compute
    assert same.num_uncomputed_tokens == 4
    assert bm.match_prefix(make_seq(range(100, 109))) == 8
    assert bm.match_prefix(make_seq([100])) == 0
    assert full.block_table[:1] == same.block_table


def test_commit_registers_only_full_computed_blocks():
    bm = BlockManager(16, BS)
    s = make_seq(range(10))
    bm.allocate(s, 10)
    s.num_computed_tokens = 3
    bm.commit(s, 0)
    assert bm.hash_to_block_id == {}
    s.num_computed_tokens = 6
    bm.commit(s, 3)
    assert [bm.blocks[b].hash is not None for b in s.block_table] == [True, False, False]
    s.num_computed_tokens = 10
    bm.commit(s, 6)
    assert [bm.blocks[b].hash is not None for b in s.block_table] == [True, True, False]
    assert bm.blocks[s.block_table[1]].token_ids == (4, 5, 6, 7)
    assert len(bm.hash_to_block_id) == 2
    # a decode that fills the third block registers it, chained to the second
    s.token_ids += [10, 11]
    bm.allocate(s, 12)
    s.num_computed_tokens = 12
    bm.commit(s, 10)
    assert bm.blocks[s.block_table[2]].hash == chain_hash(bm.blocks[s.block_table[1]].hash, (8, 9, 10, 11))


def test_freed_blocks_stay_matchable_until_reused_lru():
    bm = BlockManager(5, BS)
    a = compute(bm, make_seq(range(9)))                      # blocks 0,1 full; 2 partial
    assert a.block_table == [0, 1, 2]
    bm.free(a)
    assert list(bm.free_block_ids) == [3, 4, 2, 1, 0]
    b = make_seq(list(range(8)) + [50])
    assert bm.match_prefix(b) == 8 and b.block_table == [0, 1]   # revived from the free list
    assert [bm.blocks[x].ref_count for x in (0, 1)] == [1, 1] and bm.num_free_blocks == 3
    check_free_list(bm)
    bm.free(b)
    assert list(bm.free_block_ids) == [3, 4, 2, 1, 0]
    c = make_seq(range(200, 212))
    bm.allocate(c, 12)                                       # takes the oldest free: 3, 4, 2
    assert c.block_table == [3, 4, 2]
    assert bm.match_prefix(make_seq(list(range(8)) + [50])) == 8   # 0, 1 still cached
    bm.free(c)
    check_free_list(bm)


def test_reused_block_loses_hash():
    bm = BlockManager(2, BS)
    a = compute(bm, make_seq(range(8)))                      # exactly two full blocks
    a_blocks = list(a.block_table)
    bm.free(a)
    assert list(bm.free_block_ids) == [1, 0]
    c = make_seq([7] * 4)
    bm.allocate(c, 4)                                        # reuses block 1 (the tail)
    assert c.block_table == [1]
    assert bm.blocks[1].hash is None and bm.blocks[1].token_ids == ()
    assert 1 not in bm.hash_to_block_id.values()
    assert bm.match_prefix(make_seq(list(range(8)) + [3])) == 4    # only block 0 left
    assert a_blocks == [0, 1]
    check_free_list(bm)


def test_duplicate_content_keeps_first_registration():
    bm = BlockManager(8, BS)
    a = make_seq(range(5))
    b = make_seq(range(5))
    for s in (a, b):                                         # computed side by side, no sharing
        bm.allocate(s, 5)
        s.num_computed_tokens = 5
    bm.commit(a, 0)
    bm.commit(b, 0)
    h = bm.blocks[a.block_table[0]].hash
    assert bm.hash_to_block_id == {h: a.block_table[0]}
    bm.free(b)
    bm.allocate(make_seq(range(32)), 4 * bm.num_free_blocks)  # reuse every free block incl. b's
    assert bm.hash_to_block_id == {h: a.block_table[0]}      # b's reuse did not drop a's entry
    assert bm.match_prefix(make_seq(range(6))) == 4
    check_free_list(bm)


def test_match_prefix_guards_and_disabled_cache():
    bm = BlockManager(8, BS)
    s = compute(bm, make_seq(range(9)))
    with pytest.raises(RuntimeError):
        bm.match_prefix(s)
    off = BlockManager(8, BS, enable_prefix_caching=False)
    compute(off, make_seq(range(9)))
    assert off.hash_to_block_id == {}
    assert off.match_prefix(make_seq(range(9))) == 0


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    compute(bm, make_seq(range(9)))
    bm.reset_prefix_cache()
    assert bm.hash_to_block_id == {} and all(b.hash is None for b in bm.blocks)
    assert bm.match_prefix(make_seq(range(9))) == 0
