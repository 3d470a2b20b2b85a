"""Paged activation pool: base-projection outputs written during serving, read back by the trainer.

Device tier: per layer and group of kinds (`PoolLayout.groups`, e.g. q|k|v) one tensor
`[num_slots + 1, sum(dims)]`; each kind is a column slice of it. The last row (`scratch_slot`)
takes every row that must not be recorded, so a capture is one unconditional row scatter
(`engine.rows.copy_rows_`) with no host sync, or none at all when a step records one run of slots
(the projections write the pool directly). Slots are handed out in blocks of `block_size` from a
free list (`store.free_blocks`: runs of consecutive blocks where it can), like a KV cache
(`common.paging`: position -> slot). The scratch row counts against the budget.

When a reservation needs blocks, the eviction policy (store/pool_eviction.py: value-ordered
retention) chooses victims; store/pool_tiers.py moves their rows kind by kind to the device's
retention region (`retention_fraction`: `down` only), the pinned-CPU tier (store/host_tier.py), or
drops them. A record's rows of each kind are on the device, retained, on the host or gone
(`ActivationRecord.tier_of`); a record with nothing left stays (tier "dropped") so the trainer knows
to recompute; `release` forgets it. `demote` moves kinds on request (check-grad, tests).
Bookkeeping is plain Python under one lock; torch only holds the bytes.

Engine contract: within a step call `reserve`/`extend` for every sequence *before* building any
slot mapping of that step (an eviction hands the victim's blocks to the next reservation at once),
and `mark_captured` after the forward that wrote the rows. Gather only records you have pinned.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Hashable

import torch

from common.errors import ConfigError, ConflictError, InvalidRequestError
from common.paging import paged_slots
from store.free_blocks import FreeBlocks
from store.host_tier import HostTier, PendingRows
from store.pool_eviction import EvictionPolicy, ValueEviction
from store.pool_layout import (ActivationMissingError, ActivationRecord, DeviceBuffers, PoolLayout,
                               num_slots_for, resolve_positions)
from store.pool_stats import pool_stats
from store.pool_retention import retention_region
from store.pool_tiers import TierMover, TierView


class ActivationPool:
    def __init__(self, layout: PoolLayout, budget_bytes: int, block_size: int = 16,
                 cpu_budget_bytes: int = 0, eviction: EvictionPolicy | None = None,
                 feedback_window_s: float = 0.0, retention_fraction: float = 0.0):
        """`feedback_window_s` > 0: records unrated that long after capture are the first victims
        (store/pool_eviction.py); `eviction` replaces the whole policy. `retention_fraction`: the share
        of `budget_bytes` kept for the device's retention region (store/pool_retention.py)."""
        if block_size < 1 or budget_bytes < 0 or cpu_budget_bytes < 0 or not 0.0 <= retention_fraction < 1.0:
            raise ConfigError(f"activation pool needs block_size >= 1, budgets >= 0 and a retention fraction "
                              f"in [0, 1), got block_size={block_size} budget_bytes={budget_bytes} "
                              f"cpu_budget_bytes={cpu_budget_bytes} retention_fraction={retention_fraction}")
        self.layout, self.block_size = layout, block_size
        self.budget_bytes, self.cpu_budget_bytes = budget_bytes, cpu_budget_bytes
        retention_bytes = int(budget_bytes * retention_fraction)
        self.num_slots = num_slots_for(layout, budget_bytes - retention_bytes, block_size)
        self.num_blocks = self.num_slots // block_size
        self.scratch_slot = self.num_slots
        region = retention_region(layout, retention_bytes, block_size, self.num_slots + 1)
        buffers = DeviceBuffers(layout, self.num_slots + 1, {region.group: region.num_rows} if region else None)
        self._group_buffers, self._buffers = buffers.per_group, buffers.per_kind
        self.direct_buffers = buffers.direct        # kinds -> [layers, slots + 1, width]: written in place
        self._free_blocks = FreeBlocks(self.num_blocks)      # runs of consecutive blocks where possible
        self._records: OrderedDict[Hashable, ActivationRecord] = OrderedDict()  # LRU first
        self._eviction = eviction or ValueEviction(feedback_window_s)
        self._host = HostTier(layout, cpu_budget_bytes)
        self._index_cache: dict[Hashable, tuple[int, int, torch.Tensor]] = {}
        self._block_ready: dict[int, torch.cuda.Event] = {}   # block -> its D2H copy is done
        self._lock = threading.RLock()
        self._tiers = TierMover(self, self._eviction, self._host, region)
        self._gone: list[ActivationRecord] = []   # dropped since the last purge: forgotten once finished

    # -- reservation -----------------------------------------------------------
    def buffer(self, layer: int, kind: str) -> torch.Tensor:
        try:
            return self._buffers[(layer, kind)]        # [num_slots + 1, dim] (columns of its group's buffer)
        except KeyError:
            raise InvalidRequestError(f"activation pool has no layer {layer} kind {kind!r}") from None

    def group_buffer(self, layer: int, kinds: tuple[str, ...]) -> torch.Tensor | None:
        """[num_slots + 1, sum(dims)] of `kinds` when they are one group of the layout, else None."""
        return self._group_buffers.get((layer, tuple(kinds)))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def reserve(self, key: Hashable, num_tokens: int, offset: int = 0) -> ActivationRecord | None:
        with self._lock:
            self._purge()
            if key in self._records:
                raise ConflictError(f"activation record {key!r} already exists")
            if num_tokens < 0:
                raise InvalidRequestError(f"cannot reserve {num_tokens} activation rows")
            needed = self._blocks_for(num_tokens)
            if not self._make_room(needed, exclude=None):
                return None
            now = time.monotonic()
            record = ActivationRecord(key, num_tokens, self._take_blocks(needed), last_used=now,
                                      offset=offset, created=now)
            self._records[key] = record
            return record

    def extend(self, key: Hashable, num_tokens: int) -> bool:
        """Grow the reservation to positions [0, num_tokens); False stops capture for good."""
        with self._lock:
            record = self._require(key)
            if record.tier != "device" or record.capture_stopped:
                return False
            self._touch(record)
            if num_tokens <= record.num_tokens:
                return True
            needed = self._blocks_for(num_tokens) - len(record.blocks)
            if not self._make_room(needed, exclude=key):
                record.capture_stopped = True
                return False
            record.blocks.extend(self._take_blocks(needed, after=record.blocks[-1] if record.blocks else None))
            record.num_tokens = num_tokens
            return True

    def slot_mapping(self, key: Hashable, start: int, count: int) -> list[int]:
        with self._lock:
            record = self._require(key)
            if start < 0 or count < 0:
                raise InvalidRequestError(f"bad slot range start={start} count={count}")
            end = record.num_tokens if record.tier == "device" else 0
            stop = start + count
            mid = min(max(end, start), stop)          # positions [start, mid) are reserved
            return paged_slots(record.blocks, start, mid, self.block_size) + [self.scratch_slot] * (stop - mid)

    def slot_run(self, key: Hashable, start: int, count: int) -> int | None:
        """The slot of row `start` when rows [start, start + count) are reserved on the device in
        consecutive slots (`slot_mapping` would be first, first + 1, ...), else None; O(blocks)."""
        with self._lock:
            record = self._require(key)
            if count < 1 or start < 0 or record.tier != "device" or start + count > record.num_tokens:
                return None
            bs = self.block_size
            first_block, last_block = start // bs, (start + count - 1) // bs
            blocks = record.blocks[first_block:last_block + 1]
            if any(b != blocks[0] + i for i, b in enumerate(blocks)):
                return None
            return blocks[0] * bs + start % bs

    def mark_captured(self, key: Hashable, upto: int, version: int) -> int:
        """Rows [captured, upto) were written under adapter `version`; returns the new `captured`.

        Clamped to the reservation (rows past it went to scratch); a no-op off the device tier.
        """
        with self._lock:
            record = self._require(key)
            upto = min(upto, record.num_tokens)
            if record.tier == "device" and upto > record.captured:
                record.versions.extend([version] * (upto - record.captured))
                record.captured = upto
                self._touch(record)
            return record.captured

    # -- lifetime ----------------------------------------------------------------
    def pin(self, key: Hashable) -> None:
        with self._lock:
            self._require(key).pinned = True

    def pin_if_present(self, key: Hashable) -> bool:
        """Pin the record if the pool holds it (one lookup under the lock); False if it does not."""
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                record.pinned = True
            return record is not None

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            self._require(key).pinned = False

    def touch(self, key: Hashable) -> None:
        with self._lock:
            self._touch(self._require(key))

    def get(self, key: Hashable) -> ActivationRecord | None:
        with self._lock:
            return self._records.get(key)

    def finish(self, key: Hashable) -> None:
        """The record's sequence ended (the engine asks nothing more of it). A record with nothing left
        and no rating to keep it is forgotten then, or when it is dropped later: a server that serves
        for days keeps no trace of each answer nobody rated (the trainer takes a missing record as
        evicted, as it takes a dropped one)."""
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                record.finished = True
                self._gone.append(record)
                self._purge()

    def dropped(self, record: ActivationRecord) -> None:
        """The tier mover dropped the record's last rows (called under the lock, maybe while the pool's
        records are iterated: it is forgotten at the next purge, not now)."""
        self._gone.append(record)

    def _purge(self) -> None:
        gone, self._gone = self._gone, []
        for record in gone:
            if record.tier == "dropped" and record.finished and not record.pinned \
                    and self._records.get(record.key) is record:
                self.release(record.key)

    def release(self, key: Hashable) -> bool:
        with self._lock:
            record = self._records.pop(key, None)
            if record is None:
                return False
            self._free_blocks_of(record, copy_done=None)
            self._tiers.release(record)      # its host bytes and retention blocks
            return True

    # -- tiers -------------------------------------------------------------------------
    def demote(self, key: Hashable, kinds, to: str) -> None:
        """Move the record's rows of `kinds` down to tier `to` ("cpu" or "dropped"); a kind already
        there or lower stays. Kinds the host tier cannot take are dropped (value-ordered, as eviction)."""
        with self._lock:
            self._tiers.demote(self._require(key), tuple(kinds), to, time.monotonic())

    @property
    def drops(self) -> int:
        return self._tiers.counts["drops"]

    # -- reading -------------------------------------------------------------------
    def gather(self, key: Hashable, layer: int, kind: str,
               positions: slice | None = None) -> torch.Tensor:
        """Captured rows of one layer and kind, `[n, dim]` on `layout.device` (a copy)."""
        with self._lock:
            buffer = self.buffer(layer, kind)
            record = self._require(key)
            tier = record.tier_of(kind)
            if tier == "dropped":
                raise ActivationMissingError(f"activations of {key!r} ({kind}) were dropped: recompute")
            start, stop = resolve_positions(record, positions)
            self._touch(record)
            if tier == "device":
                return buffer.index_select(0, self._slot_index(record, start, stop))  # [n, dim]
            if tier == "retained":
                return buffer.index_select(0, self._tiers.retained_index(record, start, stop))
            return self._host.fetch(record.cpu_rows[(layer, kind)][start:stop]).wait()   # [n, dim]

    def tier_view(self, key: Hashable, start: int, stop: int) -> TierView:
        """Where rows [start, stop) of a record are, kind by kind, for a training step's reads
        (store/pool_reader.py). Only for records the caller pinned: a pinned record does not move."""
        with self._lock:
            record = self._require(key)
            resolve_positions(record, slice(start, stop))
            self._touch(record)
            tiers = {kind: record.tier_of(kind) for kind in self.layout.dims}
            slots = self._slot_index(record, start, stop) if record.tier == "device" else None   # [n]
            host = {(layer, kind): rows[start:stop] for (layer, kind), rows in (record.cpu_rows or {}).items()}
            retained = self._tiers.retained_index(record, start, stop) if record.retained_blocks else None
            return TierView(tiers, slots, host, retained)

    def fetch(self, rows: torch.Tensor) -> PendingRows:
        """Host-tier rows [n, dim] (from a `tier_view`) -> their copy to the device, started now (a
        side-stream copy on CUDA); `.wait()` before using them orders the caller's stream after it."""
        return self._host.fetch(rows)

    def device_slots(self, key: Hashable, positions: slice | None = None) -> torch.Tensor:
        """Pool slots `[n]` of a device-tier record's rows, for `gather_slots` (one index for all layers)."""
        with self._lock:
            record = self._require(key)
            if record.tier != "device":
                raise ActivationMissingError(f"activations of {key!r} are not on the device tier: recompute")
            start, stop = resolve_positions(record, positions)
            self._touch(record)
            return self._slot_index(record, start, stop)

    def gather_slots(self, layer: int, kinds: tuple[str, ...], slots: torch.Tensor) -> torch.Tensor:
        """Rows at `slots` [n] (from `device_slots`, of pinned records) of one layer, the kinds side by
        side -> [n, sum(dims)], a copy: one gather when the kinds are a group of the layout."""
        group = self.group_buffer(layer, kinds)
        if group is not None:
            return group.index_select(0, slots)
        parts = [self.buffer(layer, kind).index_select(0, slots) for kind in kinds]    # [n, dim] each
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def stats(self) -> dict:
        """Bytes per tier (and per tier and kind), records per tier, demotions, copy traffic."""
        with self._lock:
            used_rows = (self.num_blocks - len(self._free_blocks)) * self.block_size
            return pool_stats(self.layout, self._records.values(), used_rows, self.num_slots, self.block_size,
                              self._host, self._tiers)

    # -- internals ---------------------------------------------------------------------
    def _require(self, key: Hashable) -> ActivationRecord:
        record = self._records.get(key)
        if record is None:
            raise ActivationMissingError(f"no activation record {key!r}")
        return record

    def _touch(self, record: ActivationRecord) -> None:
        record.last_used = time.monotonic()
        self._records.move_to_end(record.key)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_blocks(self, count: int, after: int | None = None) -> list[int]:
        blocks = self._free_blocks.take(count, after)
        for block in blocks:
            event = self._block_ready.pop(block, None)
            if event is not None:   # later writes to this block wait for its D2H copy (GPU-side)
                torch.cuda.current_stream(self.layout.device).wait_event(event)
        return blocks

    # -- eviction: the policy chooses, store/pool_tiers.py moves the bytes ------------------
    def _make_room(self, needed: int, exclude: Hashable | None) -> bool:
        """Evict what the policy chooses until `needed` blocks are free; False changes nothing."""
        blocks_short = needed - len(self._free_blocks)
        if blocks_short <= 0:
            return True
        now = time.monotonic()
        victims = self._eviction.device_victims(list(self._records.values()), blocks_short, exclude, now)
        if victims is None:
            return False
        for record in victims:
            self._tiers.evict(record, now)
        return True

    def _free_blocks_of(self, record: ActivationRecord, copy_done) -> None:
        """Return the record's blocks to the free list; later takers wait for `copy_done` (its D2H copy)."""
        for block in record.blocks:
            if copy_done is not None:
                self._block_ready[block] = copy_done
            self._free_blocks.put(block)
        record.blocks = []
        self._index_cache.pop(record.key, None)

    def _slot_index(self, record: ActivationRecord, start: int, stop: int) -> torch.Tensor:
        cached = self._index_cache.get(record.key)
        if cached is not None and cached[:2] == (start, stop):
            return cached[2]
        slots = paged_slots(record.blocks, start, stop, self.block_size)
        index = torch.tensor(slots, dtype=torch.long, device=self.layout.device)  # [n]
        self._index_cache[record.key] = (start, stop, index)
        return index
