"""Torch-free paged KV block manager: refcounts, free list and prefix caching by chained block hashes.

A block's hash chains the previous block's hash and its own token ids; the first hash starts from
the adapter version, so KV computed under one adapter never serves a request under another.
A block is registered in the prefix cache only once its KV has been computed (`commit`).
Freed blocks keep their hash and stay matchable until the free list hands them out again (LRU).
"""
from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


def root_hash(adapter_version: int) -> int:
    return hash(("alchemist-prefix", adapter_version))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_queries = 0          # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0             # of those, found

    # -- accounting ------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Adopt cached blocks for the longest computed prefix of `seq`; returns tokens adopted.

        At least one token is always left to compute, so the last prompt position yields logits.
        """
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        prev = root_hash(seq.adapter_version)
        adopted: list[int] = []
        for i in range(max_blocks):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            prev = chain_hash(prev, tokens)
            block_id = self.hash_to_block_id.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            adopted.append(block_id)
        for block_id in adopted:
            self._ref(block_id)
        seq.block_table = adopted
        num_cached = len(adopted) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += num_cached
        return num_cached

    def can_allocate(self, seq: Sequence, num_total_tokens: int) -> bool:
        return self.blocks_needed(num_total_tokens) - len(seq.block_table) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_total_tokens: int) -> None:
        """Make sure `seq` owns blocks for its first `num_total_tokens` tokens."""
        missing = self.blocks_needed(num_total_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"allocate({seq}): {missing} blocks needed, {self.num_free_blocks} free")
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks reaching zero go to the back of the free list (LRU)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []

    def commit(self, seq: Sequence, prev_num_computed: int) -> None:
        """Register blocks that became full of computed KV since `prev_num_computed`."""
        if not self.enable_prefix_caching:
            return
        first_block = prev_num_computed // self.block_size
        last_block = seq.num_computed_tokens // self.block_size      # exclusive: full blocks only
        if first_block >= last_block:
            return
        prev = self._hash_before(seq, first_block)
        for i in range(first_block, last_block):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            prev = chain_hash(prev, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = prev, tokens
                self.hash_to_block_id.setdefault(prev, block.block_id)

    def _hash_before(self, seq: Sequence, block_index: int) -> int:
        if block_index == 0:
            return root_hash(seq.adapter_version)
        prev_block = self.blocks[seq.block_table[block_index - 1]]
        if prev_block.hash is not None:
            return prev_block.hash
        prev = root_hash(seq.adapter_version)
        for i in range(block_index):
            prev = chain_hash(prev, tuple(seq.block_tokens(i, self.block_size)))
        return prev

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (used when an adapter changes in place)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block_id.clear()
