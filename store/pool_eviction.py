"""The activation pool's eviction policy (DESIGN §3): which records leave the device tier and which
(record, kind) rows leave the pinned-CPU tier when the pool needs room. The pool keeps its records
least recently used first and asks the policy; the policy only chooses (plain Python over the
records), the pool moves the bytes (store/activation_pool.py: device tier; store/host_tier.py: host).

Value-ordered retention:
- a record still unrated (unpinned) `feedback_window_s` after its capture is unlikely to be rated: it
  goes first, and is dropped rather than demoted (no D2H traffic for it);
- otherwise unpinned device records leave least recently used first: their most valuable group to
  the device's retention region (its own least recently used records moving on), the rest to the host;
- the host tier keeps what saves the most per byte: it gives up a record's rows group of kinds by
  group in the layout's `demotion_groups` order (lowest FLOPs per byte first, `down` last; q|k|v and
  gate|up go whole, as their GEMMs are injected whole), least recently used records first within a
  group, the incoming record's rows ranked like any other;
- a pinned record (rated, waiting to be trained) never moves: the trainer may be reading it.
Records rated and trained are released by the trainer at once."""
from __future__ import annotations

from typing import Hashable, Iterable, Protocol

from store.pool_layout import ActivationRecord


class EvictionPolicy(Protocol):
    def expired(self, record: ActivationRecord, now: float) -> bool:
        """Past its feedback window unrated: dropped, not demoted."""

    def device_victims(self, records: Iterable[ActivationRecord], blocks_short: int,
                       exclude: Hashable | None, now: float) -> list[ActivationRecord] | None:
        """Device records whose blocks, freed, cover `blocks_short`; None when no choice does."""

    def retention_victims(self, records: Iterable[ActivationRecord], blocks_short: int,
                          exclude: Hashable | None, now: float) -> list[ActivationRecord] | None:
        """Records whose blocks of the device's retention region, freed, cover `blocks_short`; None
        when no choice does (their retained rows move on to the host)."""

    def host_drops(self, records: Iterable[ActivationRecord], incoming: ActivationRecord,
                   incoming_kinds: tuple[str, ...], bytes_short: int, unit_bytes,
                   groups: tuple[tuple[str, ...], ...], now: float) -> list[tuple[ActivationRecord, tuple]]:
        """(record, kinds) host rows to drop so `incoming`'s rows of `incoming_kinds` fit (`bytes_short`
        bytes missing, <= 0: none); a pair naming `incoming` means those kinds are not stored.
        `groups`: the layout's `demotion_groups`; `unit_bytes(record, kinds)` the bytes of one pair."""


class ValueEviction:
    def __init__(self, feedback_window_s: float = 0.0):
        """`feedback_window_s` > 0: unpinned records older than that go first; 0: no window."""
        self.feedback_window_s = feedback_window_s

    def expired(self, record, now):
        return (self.feedback_window_s > 0 and not record.pinned
                and now - record.created > self.feedback_window_s)

    def device_victims(self, records, blocks_short, exclude, now):
        held = [(r, len(r.blocks)) for r in records if r.tier == "device" and r.blocks]
        return self._victims(held, blocks_short, exclude, now)

    def retention_victims(self, records, blocks_short, exclude, now):
        return self._victims([(r, len(r.retained_blocks)) for r in records if r.retained_blocks],
                             blocks_short, exclude, now)

    def _victims(self, held, blocks_short, exclude, now):
        """Unpinned records (not `exclude`) of `held` [(record, blocks)], expired first, then least
        recently used, until their blocks cover `blocks_short`; None when all of them do not."""
        candidates = [(r, n) for r, n in held if not r.pinned and r.key != exclude]
        candidates.sort(key=lambda c: not self.expired(c[0], now))      # stable: LRU within each class
        victims, freed = [], 0
        for record, blocks in candidates:
            if freed >= blocks_short:
                break
            victims.append(record)
            freed += blocks
        return victims if freed >= blocks_short else None

    def host_drops(self, records, incoming, incoming_kinds, bytes_short, unit_bytes, groups, now):
        if bytes_short <= 0:
            return []
        units = [(record, record.kinds_on("cpu", group), rank)     # (record, kinds of a group, group rank)
                 for record in records if record is not incoming and not record.pinned
                 for rank, group in enumerate(groups)]
        units += [(incoming, tuple(k for k in group if k in incoming_kinds), rank)
                  for rank, group in enumerate(groups)]
        units = [unit for unit in units if unit[1]]
        units.sort(key=lambda u: (not self.expired(u[0], now), u[2], u[0].last_used, u[0] is incoming))
        drops, freed = [], 0
        for record, kinds, _ in units:
            if freed >= bytes_short:
                break
            drops.append((record, kinds))
            freed += unit_bytes(record, kinds)
        return drops
