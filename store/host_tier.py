"""The activation pool's pinned-CPU tier: captured rows of records demoted from the device, one host
allocation per record and kind (`[layers, n, dim]`, pinned on CUDA) so a kind leaves the tier on its
own (value-ordered demotion, store/pool_eviction.py), under a byte budget.

Copies run on a side stream and never stall serving: a D2H copy is queued behind the serving stream's
work so far and returns the event the pool waits on (GPU-side) before it hands the record's device
blocks to another record. An H2D fetch runs on the same side stream (so after the record's D2H copy)
and is ordered before the caller's next kernels (no host sync)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from store.pool_layout import PoolLayout


class HostTier:
    def __init__(self, layout: PoolLayout, budget_bytes: int):
        self.layout, self.budget_bytes = layout, budget_bytes
        self.bytes_used = 0
        self._cuda = layout.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(layout.device) if self._cuda else None
        self.bytes_stored = 0               # D2H traffic so far
        self.bytes_fetched = 0              # H2D traffic so far

    @property
    def bytes_free(self) -> int:
        return self.budget_bytes - self.bytes_used

    def store(self, direct_buffers: dict[tuple[str, ...], torch.Tensor], index: torch.Tensor,
              kinds: tuple[str, ...]) -> tuple[dict[tuple[int, str], torch.Tensor], torch.cuda.Event | None]:
        """Rows `index` [n] of `kinds` from the device buffers (`DeviceBuffers.direct`: kinds ->
        [layers, slots + 1, width]) into host allocations: (layer, kind) -> [n, dim] views, and the event
        of the copy's end (None on the CPU)."""
        layout, n = self.layout, index.shape[0]
        rows: dict[tuple[int, str], torch.Tensor] = {}
        if self._cuda:          # the copies see every row the serving stream wrote before this call
            self._side_stream.wait_stream(torch.cuda.current_stream(layout.device))
        with torch.cuda.stream(self._side_stream) if self._cuda else nullcontext():
            for group in layout.groups:
                wanted = [kind for kind in group if kind in kinds]
                if not wanted:
                    continue
                picked = direct_buffers[group].index_select(1, index)            # [layers, n, width]
                columns = picked.split([layout.dims[kind] for kind in group], dim=2)
                for kind, part in zip(group, columns):
                    if kind in wanted:
                        rows.update(self._copy_out(kind, part, n))
        copy_done = None
        if self._cuda:
            copy_done = torch.cuda.Event()
            copy_done.record(self._side_stream)
        stored = sum(layout.kind_bytes(kind, n) for kind in kinds)
        self.bytes_used += stored
        self.bytes_stored += stored
        return rows, copy_done

    def _copy_out(self, kind: str, part: torch.Tensor, n: int) -> dict[tuple[int, str], torch.Tensor]:
        """part: [layers, n, dim] (a column slice on the device) -> (layer, kind) -> [n, dim] host views."""
        layout = self.layout
        host = torch.empty(layout.num_layers, n, layout.dims[kind], dtype=layout.dtype,
                           pin_memory=self._cuda)                                # [layers, n, dim]
        host.copy_(part, non_blocking=self._cuda)
        return {(layer, kind): host[layer] for layer in range(layout.num_layers)}

    def free(self, num_rows: int, kinds) -> None:
        """A record's `num_rows` token rows of `kinds` left the tier."""
        self.bytes_used -= sum(self.layout.kind_bytes(kind, num_rows) for kind in kinds)

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
