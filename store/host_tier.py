"""The activation pool's pinned-CPU tier: captured rows of records evicted from the device, one host
allocation per record (pinned on CUDA), under a byte budget. Copies run on a side stream: a D2H copy
returns the event the pool waits on before it reuses the record's device blocks; an H2D fetch is
ordered before the caller's next kernels (no host sync)."""
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

    def shortfall(self, num_rows: int) -> int:
        """Bytes missing for `num_rows` more token rows (<= 0: they fit)."""
        return self.bytes_used + num_rows * self.layout.bytes_per_token - self.budget_bytes

    def store(self, group_buffers: dict[tuple[int, tuple[str, ...]], torch.Tensor], index: torch.Tensor
              ) -> tuple[dict[tuple[int, str], torch.Tensor], torch.cuda.Event | None]:
        """Rows `index` [n] of every (layer, group) buffer [slots + 1, width] into one host allocation:
        (layer, kind) -> [n, dim] views of it, and the event of the copy's end (None on the CPU)."""
        n, layout = index.shape[0], self.layout
        flat = torch.empty(n * layout.bytes_per_token // layout.element_size, dtype=layout.dtype,
                           pin_memory=self._cuda)                      # [n * sum(dims) * layers]
        if self._cuda:
            self._side_stream.wait_stream(torch.cuda.current_stream(layout.device))
        rows, offset = {}, 0
        with torch.cuda.stream(self._side_stream) if self._cuda else nullcontext():
            for (layer, group), buffer in group_buffers.items():
                dst = flat[offset:offset + n * buffer.shape[1]].view(n, buffer.shape[1])  # [n, width]
                dst.copy_(buffer.index_select(0, index), non_blocking=self._cuda)
                widths = [layout.dims[kind] for kind in group]
                rows.update({(layer, kind): part for kind, part in zip(group, dst.split(widths, dim=1))})
                offset += dst.numel()
        copy_done = None
        if self._cuda:
            copy_done = torch.cuda.Event()
            copy_done.record(self._side_stream)
        self.bytes_used += n * layout.bytes_per_token
        return rows, copy_done

    def free(self, num_rows: int) -> None:
        """A record's `num_rows` token rows left the tier."""
        self.bytes_used -= num_rows * self.layout.bytes_per_token

    def fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """Host rows [n, dim] -> a copy on the pool's device, ordered before the current stream's work."""
        device = self.layout.device
        if not self._cuda:
            return rows.to(device, copy=True)
        with torch.cuda.stream(self._side_stream):
            out = rows.to(device, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(self._side_stream)
        out.record_stream(torch.cuda.current_stream(device))
        return out
