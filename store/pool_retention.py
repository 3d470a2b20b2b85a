"""The device tier's retention region (DESIGN §3: keep what saves the most per byte): extra rows of
the buffer of the layout's most valuable group of kinds (`down` at Llama shapes: its input is the MLP
width, ~3.5x the FLOPs per byte of the others), handed out in blocks like the capture slots. A record
leaving the device keeps its rows of that group here (one device-to-device copy on the serving
stream, in order with the captures that reuse its blocks) while its cheaper kinds go to the host:
kind by kind, `down` last. Its slots come after the capture slots and the scratch row, so captures
never write them."""
from __future__ import annotations

import torch

from common.paging import paged_slots
from store.free_blocks import FreeBlocks


def retention_region(layout, budget_bytes: int, block_size: int, first_slot: int) -> "RetentionRegion | None":
    """The region `budget_bytes` buys for the layout's most valuable group (None when not one block)."""
    group = layout.demotion_groups[-1]
    row_bytes = layout.num_layers * layout.width(group) * layout.element_size
    num_blocks = budget_bytes // row_bytes // block_size
    return RetentionRegion(group, first_slot, num_blocks, block_size) if num_blocks else None


class RetentionRegion:
    def __init__(self, group: tuple[str, ...], first_slot: int, num_blocks: int, block_size: int):
        self.group, self.first_slot, self.block_size = group, first_slot, block_size
        self.num_blocks = num_blocks
        self.free = FreeBlocks(num_blocks)
        self._ready: dict[int, torch.cuda.Event] = {}      # block -> the D2H copy out of it is done

    @property
    def num_rows(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_rows: int) -> int:
        return -(-num_rows // self.block_size)

    def take(self, count: int, device: torch.device) -> list[int]:
        """`count` free blocks (the caller checked there are); writes to them wait for copies out."""
        blocks = self.free.take(count)
        for block in blocks:
            event = self._ready.pop(block, None)
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
        return blocks

    def put(self, blocks: list[int], copy_done) -> None:
        for block in blocks:
            if copy_done is not None:
                self._ready[block] = copy_done
            self.free.put(block)

    def slots(self, blocks: list[int], num_rows: int, device: torch.device) -> torch.Tensor:
        """Buffer rows [num_rows] of positions [0, num_rows) held in `blocks`."""
        rows = paged_slots(blocks, 0, num_rows, self.block_size)
        return torch.tensor([self.first_slot + r for r in rows], dtype=torch.long, device=device)
