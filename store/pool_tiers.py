"""How a record's rows move between the activation pool's tiers, kind by kind (DESIGN §3): device
(capture slots) -> retained (the device's retention region, the most valuable group only) -> pinned-CPU
host -> dropped. The eviction policy (store/pool_eviction.py) chooses; this module moves the bytes and
keeps the books (a record's per-kind tiers, the host budget, demotion counts).

A record leaves the capture slots whole (its slots hold every kind), but where its kinds go is decided
kind by kind: the retention region keeps the most valuable group (`down`) on the device while there
is room (its oldest records' rows moving on to the host), the host tier takes the kinds that save the
most per byte and drops the rest, giving up other records' cheaper kinds first. A demotion also stops
the record's capture: rows written later would not be where its kinds say."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from common.errors import InvalidRequestError
from store.pool_layout import TIERS, ActivationRecord


@dataclass
class TierView:
    """Where rows [start, stop) of one record are (`ActivationPool.tier_view`)."""
    tiers: dict[str, str]                            # kind -> device | retained | cpu | dropped
    slots: torch.Tensor | None                       # [n] capture slots (for `gather_slots`), if any
    host: dict[tuple[int, str], torch.Tensor]        # (layer, kind) -> [n, dim] host rows (pinned on CUDA)
    retained_slots: torch.Tensor | None = None       # [n] rows of the retention region, if any


class TierMover:
    """Owned by one ActivationPool; called under its lock. `region`: its RetentionRegion, or None."""

    def __init__(self, pool, policy, host, region=None):
        self.pool, self.policy, self.host, self.region = pool, policy, host, region
        self.layout = pool.layout
        self.order = self.layout.demotion_order
        self.groups = self.layout.demotion_groups
        self.counts = Counter(evictions_to_cpu=0, drops=0)
        self.demotions: dict[str, Counter] = {}      # "device->cpu" etc. -> kind -> rows of that kind moved

    def evict(self, record: ActivationRecord, now: float) -> None:
        """A device victim leaves the capture slots: dropped when past its feedback window (or empty),
        else its most valuable group to the retention region where it has room, the rest to the host
        as far as the host keeps them."""
        kinds = record.kinds_on("device", self.order)
        if self.policy.expired(record, now) or not record.captured:
            self.demote(record, kinds, "dropped", now)
            return
        retained = self._retain(record, kinds, now)
        self.demote(record, tuple(k for k in kinds if k not in retained), "cpu", now)
        if record.kinds_on("cpu", kinds):
            self.counts["evictions_to_cpu"] += 1

    def demote(self, record: ActivationRecord, kinds: tuple[str, ...], to: str, now: float) -> None:
        if to not in ("cpu", "dropped"):
            raise InvalidRequestError(f"demote to {to!r}: use cpu or dropped")
        unknown = set(kinds) - set(self.layout.dims)
        if unknown:
            raise InvalidRequestError(f"the activation pool stores no kind {sorted(unknown)}; "
                                      f"kinds: {list(self.layout.dims)}")
        on_device = record.kinds_on("device", kinds) + record.kinds_on("retained", kinds)
        copies = {}
        if to == "dropped":
            self.drop_host(record, record.kinds_on("cpu", kinds))
            self._set(record, {kind: "dropped" for kind in on_device})
        else:
            copies = self._to_host(record, on_device, now)
        if on_device:
            record.capture_stopped = True
        if record.blocks and record.tier != "device":
            self.pool._free_blocks_of(record, copies.get("device"))
        if record.retained_blocks and not record.kinds_on("retained", self.order):
            self.region.put(record.retained_blocks, copies.get("retained"))
            record.retained_blocks = []

    def _retain(self, record: ActivationRecord, kinds: tuple[str, ...], now: float) -> tuple[str, ...]:
        """Copy the record's rows of the region's group into the retention region (device to device,
        on the serving stream) when it has or can make room; returns the kinds kept there."""
        region = self.region
        if region is None or not set(region.group) <= set(kinds):
            return ()
        need = region.blocks_for(record.captured)
        short = need - len(region.free)
        if short > 0:
            victims = self.policy.retention_victims(list(self.pool._records.values()), short, record.key, now)
            if victims is None:
                return ()
            for victim in victims:
                expired = self.policy.expired(victim, now)
                self.demote(victim, victim.kinds_on("retained", self.order), "dropped" if expired else "cpu", now)
        device = self.layout.device
        record.retained_blocks = region.take(need, device)
        rows = self.pool.direct_buffers[region.group]                            # [layers, rows, width]
        src = self.pool._slot_index(record, 0, record.captured)                 # [captured]
        dst = region.slots(record.retained_blocks, record.captured, device)     # [captured]
        rows.index_copy_(1, dst, rows.index_select(1, src))
        self._set(record, {kind: "retained" for kind in region.group})
        return region.group

    def _to_host(self, record: ActivationRecord, kinds: tuple[str, ...], now: float) -> dict:
        """Copy the record's rows of `kinds` (on the device or retained) to the host, making room there
        by the policy; kinds it refuses are dropped. Returns {"device" | "retained": the event of the
        copy out of those slots} (none on the CPU)."""
        if not kinds:
            return {}
        if not record.captured:
            self._set(record, {kind: "dropped" for kind in kinds})
            return {}
        unit_bytes = lambda r, group: sum(self.layout.kind_bytes(kind, r.captured) for kind in group)
        short = unit_bytes(record, kinds) - self.host.bytes_free
        drops = self.policy.host_drops(list(self.pool._records.values()), record, kinds, short, unit_bytes,
                                       self.groups, now)
        refused = {kind for r, group in drops if r is record for kind in group}
        for other, group in drops:
            if other is not record:
                self.drop_host(other, group)
        copies, taken = {}, []
        for source in ("device", "retained"):
            wanted = tuple(k for k in record.kinds_on(source, kinds) if k not in refused)
            if not wanted:
                continue
            rows, copies[source] = self.host.store(self.pool.direct_buffers, self._source_index(record, source),
                                                   wanted)
            record.cpu_rows = {**(record.cpu_rows or {}), **rows}
            taken += [kind for kind in wanted if (0, kind) in rows]
            refused |= {kind for kind in wanted if (0, kind) not in rows}     # no arena range that long
        self._set(record, {**{kind: "cpu" for kind in taken}, **{kind: "dropped" for kind in refused}})
        return copies

    def _source_index(self, record: ActivationRecord, source: str) -> torch.Tensor:
        """Buffer rows [captured] of the record's rows in the capture slots or the retention region."""
        if source == "device":
            return self.pool._slot_index(record, 0, record.captured)
        return self.retained_index(record, 0, record.captured)

    def retained_index(self, record: ActivationRecord, start: int, stop: int) -> torch.Tensor:
        """Buffer rows [stop - start] of the record's positions [start, stop) in the retention region."""
        return self.region.slots(record.retained_blocks, record.captured, self.layout.device)[start:stop]

    def drop_host(self, record: ActivationRecord, kinds: tuple[str, ...]) -> None:
        """The record's host rows of `kinds` leave the tier (their bytes return to its budget)."""
        if not kinds:
            return
        self.host.free(record.cpu_rows, kinds, record.captured)
        for kind in kinds:
            for layer in range(self.layout.num_layers):
                record.cpu_rows.pop((layer, kind), None)
        self._set(record, {kind: "dropped" for kind in kinds})

    def release(self, record: ActivationRecord) -> None:
        """A released record: its host bytes return to the budget, its retention blocks to the region."""
        self.host.free(record.cpu_rows, record.kinds_on("cpu", self.order), record.captured)
        record.cpu_rows = None
        if record.retained_blocks:
            self.region.put(record.retained_blocks, None)
            record.retained_blocks = []

    def _set(self, record: ActivationRecord, changes: dict[str, str]) -> None:
        """New tiers for some kinds; the record's tier becomes the best of its kinds'."""
        tiers = {kind: record.tier_of(kind) for kind in self.layout.dims}
        for kind, tier in changes.items():
            if tiers[kind] != tier:
                self.demotions.setdefault(f"{tiers[kind]}->{tier}", Counter())[kind] += record.captured
                tiers[kind] = tier
        was = record.tier
        record.tier = next(t for t in TIERS if t in tiers.values() or t == "dropped")
        record.kind_tiers = {} if len(set(tiers.values())) == 1 else tiers
        if "cpu" not in tiers.values():
            record.cpu_rows = None
        if record.tier == "dropped" and was != "dropped":
            self.counts["drops"] += 1
            self.pool.dropped(record)
