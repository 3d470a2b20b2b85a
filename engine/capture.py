"""Which rows of a serving step are recorded into the activation pool (DESIGN §3), host side.

One begin/end pair per engine step, both called by `LLMEngine.step`: `begin(batch)` reserves the
records' rows and returns the step's `CaptureMetadata` (the forward writes the rows through it),
`end(adapter_version)` marks the rows written. The pool's layout and bytes are store/'s.

Modes (`EngineConfig.capture`): `none` (no manager), `prefill` (prompt rows), `prefill+decode`
(prompt rows and every decoded row that a training forward over [prompt | response] needs). Policy: a
request's own `capture` (true / false), else every request while the pool has room, or a
deterministic share (`capture_fraction`); unpinned records are evicted LRU by the pool. A record is
keyed by (response id, choice index) and its rows carry the adapter version that produced them.
"""
from __future__ import annotations

import zlib

import torch

from engine.context import CaptureMetadata, to_device
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


def record_key(seq: Sequence) -> tuple[str, int]:
    return seq.record_key                # (response id, choice index), as the feedback names it


class CaptureManager:
    def __init__(self, pool, captures_decode: bool, fraction: float = 1.0, side_stream: bool = False):
        """`side_stream` (CUDA pools): eager steps copy their rows on a stream of their own, joined
        before the step ends (`EngineConfig.capture_stream`)."""
        self.pool = pool                    # store.activation_pool.ActivationPool
        self.fraction = fraction
        self.captures_decode = captures_decode
        device = pool.layout.device
        self.side_stream = torch.cuda.Stream(device, priority=-100) \
            if side_stream and device.type == "cuda" else None
        self._pending: dict[tuple[str, int], tuple[int, int]] = {}   # key -> rows written this step
        self.steps = {"one_run": 0, "scattered": 0}    # steps whose recorded rows are one run of slots, or not

    def begin(self, batch: ScheduledBatch) -> CaptureMetadata | None:
        """Before the forward of `batch`: reserve its recorded rows; what the forward writes where
        (None when no row of it is recorded). No host sync: the slots go up pinned, non-blocking."""
        slots = self.slot_mapping(batch)
        if slots is None:
            return None
        first_slot = self.run_start(slots) if self.side_stream is None else None
        device = self.pool.layout.device
        slot_mapping = to_device(slots, torch.int64, device) if first_slot is None else None   # [T]
        return CaptureMetadata(self.pool, slot_mapping, self.side_stream, first_slot)

    def end(self, adapter_version: int) -> None:
        """After the step: the rows written this step extend each record's contiguous capture."""
        for key, (first_row, end_row) in self._pending.items():
            record = self.pool.get(key)
            if record is not None and first_row <= record.captured < end_row:
                self.pool.mark_captured(key, end_row, adapter_version)
        self._pending.clear()

    def limit(self, seq: Sequence) -> int:
        """Positions [0, limit) are recorded: the prompt, or every position a training forward uses."""
        if self.captures_decode:
            return seq.num_prompt_tokens + (seq.params.max_tokens or 1 << 30)
        return seq.num_prompt_tokens

    def sampled(self, seq: Sequence) -> bool:
        """The capture policy: what the request asked for (`capture: true/false`), else every request
        while the pool has room, or a deterministic share of them (`capture_fraction`; 0 = opt-in only)."""
        if seq.params.capture is not None:
            return seq.params.capture
        if self.fraction >= 1.0:
            return True
        return zlib.crc32(seq.request_id.encode()) / 0xFFFFFFFF < self.fraction

    def _reserve(self, seq: Sequence, start: int, upto: int) -> bool:
        """Make the record of `seq` hold positions up to `upto`. A record starts where the sequence
        first computes (after its prefix-cache hit, whose rows another sequence computed) and
        grows contiguously; rows that would leave a gap are not recorded."""
        key = record_key(seq)
        record = self.pool.get(key)
        if record is None:
            return self.sampled(seq) and self.pool.reserve(key, upto - start, offset=start) is not None
        if start > record.offset + record.captured or upto <= record.offset:
            return False
        rows = upto - record.offset
        return record.num_tokens >= rows or self.pool.extend(key, rows)

    def slot_mapping(self, batch: ScheduledBatch) -> list[int] | range | None:
        """Pool slot of every token of the batch (scratch where not recorded); None if none is; a
        range when the batch is one sequence whose rows all go to one run of slots (no list built).

        Two passes: every reservation first (a reservation may evict another record), then slots
        only for records still on the device tier, so no two rows of a step share a slot.
        """
        ranges = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = min(start + n, self.limit(seq))
            ranges.append((start, end) if end > start and self._reserve(seq, start, end) else None)
        scratch = self.pool.scratch_slot
        slots: list[int] = []
        self._pending.clear()
        run = self._one_run(batch, ranges)
        if run is not None:
            return run
        for seq, n, span in zip(batch.seqs, batch.num_new_tokens, ranges):
            key = record_key(seq)
            record = self.pool.get(key) if span is not None else None
            if record is None or record.tier != "device":
                slots += [scratch] * n
                continue
            start, end = span
            first = max(start, record.offset)                   # positions below the record's start
            slots += [scratch] * (first - start)
            slots += self.pool.slot_mapping(key, first - record.offset, end - first)
            slots += [scratch] * (start + n - end)
            self._pending[key] = (first - record.offset, end - record.offset)
        return slots if self._pending else None

    def _one_run(self, batch: ScheduledBatch, ranges: list) -> range | None:
        """Slots of a one-sequence step that records every row of it into consecutive slots; else None."""
        if len(batch.seqs) != 1 or ranges[0] is None:
            return None
        seq, (start, end) = batch.seqs[0], ranges[0]
        key = record_key(seq)
        record = self.pool.get(key)
        if record is None or start < record.offset or end - start != batch.num_new_tokens[0]:
            return None
        first = self.pool.slot_run(key, start - record.offset, end - start)
        if first is None:
            return None
        self._pending[key] = (start - record.offset, end - record.offset)
        return range(first, first + end - start)

    def run_start(self, slots: list[int] | range) -> int | None:
        """The first slot when a step's `slots` are first, first + 1, ... (every row recorded, one run):
        an eager forward's projections then write the pool rows directly. None otherwise."""
        first, count = slots[0], len(slots)
        one_run = (first + count <= self.pool.scratch_slot and slots[-1] == first + count - 1
                   and (isinstance(slots, range) or slots == list(range(first, first + count))))
        self.steps["one_run" if one_run else "scattered"] += 1
        return first if one_run else None

    def release(self, seq: Sequence) -> None:
        self.pool.release(record_key(seq))

    def finish(self, seq: Sequence) -> None:
        """The sequence ended: the pool may forget its record once nothing of it is left."""
        self.pool.finish(record_key(seq))
