"""The activation pool's eviction policy (DESIGN §3): which records leave a tier when the pool needs
room. The pool keeps its records least recently used first and asks the policy for victims; the
policy only chooses (plain Python over the records), the pool moves the bytes
(store/activation_pool.py: device tier; store/host_tier.py: pinned-CPU tier).

LRU: unpinned device records, oldest use first, go to the CPU tier when it takes them (dropping
unpinned CPU records used less recently, to make room), else they are dropped."""
from __future__ import annotations

from typing import Hashable, Iterable, Protocol

from store.pool_layout import ActivationRecord


class EvictionPolicy(Protocol):
    def device_victims(self, records: Iterable[ActivationRecord], blocks_short: int,
                       exclude: Hashable | None) -> list[ActivationRecord] | None:
        """Device records whose blocks, freed, cover `blocks_short`; None when no choice does."""

    def host_victims(self, records: Iterable[ActivationRecord], incoming: ActivationRecord,
                     bytes_short: int, bytes_per_token: int) -> list[ActivationRecord] | None:
        """CPU-tier records to drop so that `incoming` fits (`bytes_short` bytes missing, <= 0: none);
        None when `incoming` should be dropped instead."""


class LRUEviction:
    """Least recently used first, never a pinned record (records come least recently used first)."""

    def device_victims(self, records, blocks_short, exclude):
        victims, freed = [], 0
        for record in records:
            if freed >= blocks_short:
                break
            if record.tier == "device" and not record.pinned and record.blocks and record.key != exclude:
                victims.append(record)
                freed += len(record.blocks)
        return victims if freed >= blocks_short else None

    def host_victims(self, records, incoming, bytes_short, bytes_per_token):
        """Only records used less recently than `incoming`: a newer CPU record stays."""
        victims, freed = [], 0
        for record in records:
            if record is incoming or freed >= bytes_short:
                break
            if record.tier == "cpu" and not record.pinned:
                victims.append(record)
                freed += record.captured * bytes_per_token
        return victims if freed >= bytes_short else None
