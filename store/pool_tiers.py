"""How a record's rows move between the activation pool's tiers, kind by kind (DESIGN §3): device ->
pinned-CPU host -> dropped. The eviction policy (store/pool_eviction.py) chooses; this module moves
the bytes and keeps the books (a record's per-kind tiers, the host budget, demotion counts).

A record leaves the device whole (its slots hold every kind), but what reaches the host is decided
kind by kind: the host tier takes the kinds that save the most per byte and drops the rest, giving up
other records' cheaper kinds first. A demotion also stops the record's capture: rows written later
would not be where its kinds say."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from common.errors import InvalidRequestError
from store.pool_layout import TIERS, ActivationRecord


@dataclass
class TierView:
    """Where rows [start, stop) of one record are (`ActivationPool.tier_view`)."""
    tiers: dict[str, str]                            # kind -> device | cpu | dropped
    slots: torch.Tensor | None                       # [n] device slots (for `gather_slots`), if on the device
    host: dict[tuple[int, str], torch.Tensor]        # (layer, kind) -> [n, dim] host rows (pinned on CUDA)


class TierMover:
    """Owned by one ActivationPool; called under its lock."""

    def __init__(self, pool, policy, host):
        self.pool, self.policy, self.host = pool, policy, host
        self.layout = pool.layout
        self.order = self.layout.demotion_order
        self.groups = self.layout.demotion_groups
        self.counts = Counter(evictions_to_cpu=0, drops=0)
        self.demotions: dict[str, Counter] = {}      # "device->cpu" etc. -> kind -> rows of that kind moved

    def evict(self, record: ActivationRecord, now: float) -> None:
        """A device victim leaves the device: dropped when past its feedback window (or empty), else
        its device kinds go to the host tier as far as the host keeps them."""
        kinds = record.kinds_on("device", self.order)
        to = "dropped" if self.policy.expired(record, now) or not record.captured else "cpu"
        self.demote(record, kinds, to, now)
        if to == "cpu" and record.kinds_on("cpu", kinds):
            self.counts["evictions_to_cpu"] += 1

    def demote(self, record: ActivationRecord, kinds: tuple[str, ...], to: str, now: float) -> None:
        if to not in ("cpu", "dropped"):
            raise InvalidRequestError(f"demote to {to!r}: use cpu or dropped")
        unknown = set(kinds) - set(self.layout.dims)
        if unknown:
            raise InvalidRequestError(f"the activation pool stores no kind {sorted(unknown)}; "
                                      f"kinds: {list(self.layout.dims)}")
        on_device = record.kinds_on("device", kinds)
        copy_done = None
        if to == "dropped":
            self.drop_host(record, record.kinds_on("cpu", kinds))
            self._set(record, {kind: "dropped" for kind in on_device})
        else:
            copy_done = self._to_host(record, on_device, now)
        if on_device:
            record.capture_stopped = True
        if record.blocks and record.tier != "device":
            self.pool._free_blocks_of(record, copy_done)

    def _to_host(self, record: ActivationRecord, kinds: tuple[str, ...], now: float):
        """Copy the record's rows of `kinds` (on the device) to the host, making room there by the
        policy; kinds it refuses are dropped. Returns the copy's event (None: no copy or the CPU)."""
        if not kinds:
            return None
        if not record.captured:
            self._set(record, {kind: "dropped" for kind in kinds})
            return None
        unit_bytes = lambda r, group: sum(self.layout.kind_bytes(kind, r.captured) for kind in group)
        short = unit_bytes(record, kinds) - self.host.bytes_free
        drops = self.policy.host_drops(list(self.pool._records.values()), record, kinds, short, unit_bytes,
                                       self.groups, now)
        refused = {kind for r, group in drops if r is record for kind in group}
        for other, group in drops:
            if other is not record:
                self.drop_host(other, group)
        taken = tuple(kind for kind in kinds if kind not in refused)
        copy_done = None
        if taken:
            index = self.pool._slot_index(record, 0, record.captured)              # [captured]
            rows, copy_done = self.host.store(self.pool.direct_buffers, index, taken)
            record.cpu_rows = {**(record.cpu_rows or {}), **rows}
            refused |= {kind for kind in taken if (0, kind) not in rows}      # no arena range that long
            taken = tuple(kind for kind in taken if (0, kind) in rows)
        self._set(record, {**{kind: "cpu" for kind in taken}, **{kind: "dropped" for kind in refused}})
        return copy_done

    def drop_host(self, record: ActivationRecord, kinds: tuple[str, ...]) -> None:
        """The record's host rows of `kinds` leave the tier (their bytes return to its budget)."""
        if not kinds:
            return
        self.host.free(record.cpu_rows, kinds, record.captured)
        for kind in kinds:
            for layer in range(self.layout.num_layers):
                record.cpu_rows.pop((layer, kind), None)
        self._set(record, {kind: "dropped" for kind in kinds})

    def free_host(self, record: ActivationRecord) -> None:
        """A released record: its host bytes return to the budget."""
        self.host.free(record.cpu_rows, record.kinds_on("cpu", self.order), record.captured)
        record.cpu_rows = None

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
