"""The activation pool's pinned-CPU tier: captured rows of records demoted from the device, one range
of the tier's arena (store/host_arena.py: pinned on CUDA, allocated once) per record and kind
(`[layers, n, dim]`), so a kind leaves the tier on its own (value-ordered demotion,
store/pool_eviction.py), under a byte budget.

Copies run on a side stream and never stall serving: a D2H copy is queued behind the serving stream's
work so far and returns the event the pool waits on (GPU-side) before it hands the record's device
blocks to another record. An H2D fetch runs on the same side stream (so after the record's D2H copy)
and is ordered before the caller's next kernels (no host sync)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from store.host_arena import HostArena
from store.pool_layout import PoolLayout


class HostTier:
    def __init__(self, layout: PoolLayout, budget_bytes: int):
        self.layout, self.budget_bytes = layout, budget_bytes
        self.bytes_used = 0
        self._cuda = layout.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(layout.device) if self._cuda else None
        self.arena = HostArena(budget_bytes // layout.element_size, layout.dtype, pin=self._cuda)
        self.bytes_stored = 0               # D2H traffic so far
        self.bytes_fetched = 0              # H2D traffic so far

    @property
    def bytes_free(self) -> int:
        return self.budget_bytes - self.bytes_used

    def store(self, direct_buffers: dict[tuple[str, ...], torch.Tensor], index: torch.Tensor,
              kinds: tuple[str, ...]) -> tuple[dict[tuple[int, str], torch.Tensor], torch.cuda.Event | None]:
        """Rows `index` [n] of `kinds` from the device buffers (`DeviceBuffers.direct`: kinds ->
        [layers, slots + 1, width]) into arena ranges: (layer, kind) -> [n, dim] views, and the event of
        the copy's end (None on the CPU). Ranges are taken most valuable kind first (`down` first), and a
        kind with no free range that long is left out of the rows."""
        layout, n = self.layout, index.shape[0]
        ranges = {}
        for kind in reversed(layout.demotion_order):
            flat = self.arena.alloc(layout.num_layers * n * layout.dims[kind]) if kind in kinds else None
            if flat is not None:
                ranges[kind] = flat.view(layout.num_layers, n, layout.dims[kind])     # [layers, n, dim]
        if self._cuda:          # the copies see every row the serving stream wrote before this call
            self._side_stream.wait_stream(torch.cuda.current_stream(layout.device))
            index.record_stream(self._side_stream)     # the pool may drop its index before the copies ran
        with torch.cuda.stream(self._side_stream) if self._cuda else nullcontext():
            for group in layout.groups:
                if not any(kind in ranges for kind in group):
                    continue
                picked = direct_buffers[group].index_select(1, index)            # [layers, n, width]
                for kind, part in zip(group, picked.split([layout.dims[k] for k in group], dim=2)):
                    if kind in ranges:
                        ranges[kind].copy_(part, non_blocking=self._cuda)
        copy_done = None
        if self._cuda:
            copy_done = torch.cuda.Event()
            copy_done.record(self._side_stream)
        stored = sum(layout.kind_bytes(kind, n) for kind in ranges)
        self.bytes_used += stored
        self.bytes_stored += stored
        return {(layer, kind): host[layer] for kind, host in ranges.items()
                for layer in range(layout.num_layers)}, copy_done

    def free(self, rows: dict[tuple[int, str], torch.Tensor], kinds, num_rows: int) -> None:
        """A record's `num_rows` token rows of `kinds` (`rows`: what `store` returned for them) left the
        tier: their arena ranges are free again."""
        layout = self.layout
        for kind in kinds:
            self.arena.free(rows[(0, kind)].storage_offset(), layout.num_layers * num_rows * layout.dims[kind])
            self.bytes_used -= layout.kind_bytes(kind, num_rows)

    def fetch(self, rows: torch.Tensor) -> "PendingRows":
        """Host rows [n, dim] -> a copy on the pool's device, in flight on the side stream (pinned
        rows: it overlaps the caller's kernels) until the caller's `wait()`. The caller's stream is the
        current stream of the calling thread, now and at `wait()`."""
        device = self.layout.device
        self.bytes_fetched += rows.numel() * rows.element_size()
        if not self._cuda:
            return PendingRows(rows.to(device, copy=True), None)
        with torch.cuda.stream(self._side_stream):       # after this record's D2H copy (same stream)
            out = rows.to(device, non_blocking=True)                         # [n, dim]
            done = torch.cuda.Event()
            done.record(self._side_stream)
        out.record_stream(torch.cuda.current_stream(device))   # freed only after the caller's use
        return PendingRows(out, done)


class PendingRows:
    """A host -> device copy in flight: `wait()` orders the caller's stream after it (no host sync)
    and returns the rows."""

    def __init__(self, rows: torch.Tensor, done: torch.cuda.Event | None):
        self.rows, self.done = rows, done

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            torch.cuda.current_stream(self.rows.device).wait_event(self.done)
        return self.rows
