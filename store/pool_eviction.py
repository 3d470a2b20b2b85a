"""LRU eviction for the activation pool (store/activation_pool.py): when a reservation needs blocks,
unpinned device records are evicted least recently used first — their captured rows copied to the
pinned-CPU tier when its budget allows (dropping older unpinned CPU records to make room), else the
record is dropped (kept as tier "dropped" so the trainer knows to recompute). A mixin of
`ActivationPool`: it works on the pool's records, free list, buffers and budgets, under the pool's lock."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Hashable

import torch

from store.pool_layout import ActivationRecord


class TierEviction:
    def _make_room(self, needed: int, exclude: Hashable | None) -> bool:
        """Evict LRU unpinned device records until `needed` blocks are free; False changes nothing."""
        shortfall = needed - len(self._free_blocks)
        if shortfall <= 0:
            return True
        victims, freed = [], 0
        for record in self._records.values():
            if freed >= shortfall:
                break
            if record.tier == "device" and not record.pinned and record.blocks and record.key != exclude:
                victims.append(record)
                freed += len(record.blocks)
        if freed < shortfall:
            return False
        for record in victims:
            self._evict(record)
        return True

    def _evict(self, record: ActivationRecord) -> None:
        need = record.captured * self.layout.bytes_per_token
        if record.captured == 0 or not self._make_cpu_room(record, need):
            self._drop(record)
            return
        rows, copy_done = self._copy_to_cpu(record)
        self._free_storage(record, copy_done)
        record.tier, record.cpu_rows = "cpu", rows
        self._cpu_bytes += need
        self.evictions_to_cpu += 1

    def _make_cpu_room(self, record: ActivationRecord, need: int) -> bool:
        """Drop unpinned CPU records used less recently than `record` until `need` bytes fit."""
        shortfall = self._cpu_bytes + need - self.cpu_budget_bytes
        chosen, freed = [], 0
        for other in self._records.values():
            if other is record or freed >= shortfall:
                break
            if other.tier == "cpu" and not other.pinned:
                chosen.append(other)
                freed += other.captured * self.layout.bytes_per_token
        if freed < shortfall:
            return False
        for other in chosen:
            self._drop(other)
        return True

    def _copy_to_cpu(self, record: ActivationRecord):
        """Captured rows of every layer and kind into one host allocation (pinned on CUDA)."""
        n, layout = record.captured, self.layout
        flat = torch.empty(n * layout.bytes_per_token // layout.element_size, dtype=layout.dtype,
                           pin_memory=self._cuda)                      # [n * sum(dims) * layers]
        index = self._slot_index(record, 0, n)                           # [n]
        if self._cuda:
            self._side_stream.wait_stream(torch.cuda.current_stream(layout.device))
        rows, offset = {}, 0
        with torch.cuda.stream(self._side_stream) if self._cuda else nullcontext():
            for (layer, group), buffer in self._group_buffers.items():
                dst = flat[offset:offset + n * buffer.shape[1]].view(n, buffer.shape[1])  # [n, width]
                dst.copy_(buffer.index_select(0, index), non_blocking=self._cuda)
                widths = [layout.dims[kind] for kind in group]
                rows.update({(layer, kind): part for kind, part in zip(group, dst.split(widths, dim=1))})
                offset += dst.numel()
        copy_done = None
        if self._cuda:
            copy_done = torch.cuda.Event()
            copy_done.record(self._side_stream)
        return rows, copy_done

    def _drop(self, record: ActivationRecord) -> None:
        self._free_storage(record, copy_done=None)
        record.tier = "dropped"
        self.drops += 1
