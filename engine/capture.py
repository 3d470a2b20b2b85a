"""Which rows of a serving step are recorded into the activation pool (DESIGN §3), host side.

Modes: `none`, `prefill` (prompt rows), `prefill+decode` (prompt rows and every decoded row that a
training forward over [prompt | response] needs). Policy: a request's own `capture` (true / false),
else every request while the pool has room, or a deterministic share (`capture_fraction`); unpinned
records are evicted LRU by the pool. A record is keyed by (response id, choice index)
and its rows carry the adapter version that produced them.
"""
from __future__ import annotations

import zlib

from common.errors import ConfigError
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

CAPTURE_MODES = ("none", "prefill", "prefill+decode")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = (("q", "k", "v"), ("gate", "up"))   # one GEMM each on CUDA (engine/packing.py): one pool buffer each


def record_key(seq: Sequence) -> tuple[str, int]:
    return seq.record_key                # (response id, choice index), as the feedback names it


def projection_dims(hf_config) -> dict[str, int]:
    heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    return {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim, "o": h,
            "gate": i, "up": i, "down": h}


class CaptureManager:
    def __init__(self, pool, mode: str, fraction: float = 1.0):
        if mode not in CAPTURE_MODES:
            raise ConfigError(f"capture={mode!r}: use one of {CAPTURE_MODES}")
        self.pool = pool
        self.mode = mode
        self.fraction = fraction
        self.captures_decode = mode == "prefill+decode"
        self._pending: dict[tuple[str, int], tuple[int, int]] = {}   # key -> rows written this step
        self.steps = {"one_run": 0, "scattered": 0}    # steps whose recorded rows are one run of slots, or not

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

    def commit(self, adapter_version: int) -> None:
        """After the step: the rows written this step extend each record's contiguous capture."""
        for key, (first_row, end_row) in self._pending.items():
            record = self.pool.get(key)
            if record is not None and first_row <= record.captured < end_row:
                self.pool.mark_captured(key, end_row, adapter_version)
        self._pending.clear()

    def release(self, seq: Sequence) -> None:
        self.pool.release(record_key(seq))
