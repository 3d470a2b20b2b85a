"""Continuous batching under a per-step token budget, with chunked prefill and preemption by recompute.

Each step: running sequences in decode first (one token each), then running sequences still in
prefill (a chunk each), then waiting sequences (FCFS, prefix cache first). When blocks run out,
the most recently admitted running sequence is preempted: its blocks are freed and it is recomputed
later from its tokens. Torch-free: unit-tested without a model.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per seq
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether seq i reaches its newest token this step, so its last row is sampled."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: set[int]):
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.uncommitted_from = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    # -- scheduling ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:       # preempted earlier in this loop
                continue
            if seq.has_unresolved and self._ends_by_length(seq, seq.num_tokens):
                continue                      # its token in flight is its last (overlapped scheduling)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve_running(seq, num_new, batch):
                batch.add(seq, num_new)
                budget -= num_new
        if not batch.preempted:               # freed blocks are for running sequences, not admissions
            self._admit_waiting(batch, budget)
        return batch

    def _reserve_running(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Find blocks for `seq`, preempting the newest running sequences; False if `seq` itself went."""
        bm = self.block_manager
        while not bm.can_allocate(seq, seq.num_computed_tokens + num_new):
            # the newest running sequence not already in this step (never preempt scheduled work)
            victim = next(s for s in reversed(self.running) if s is seq or s not in batch.seqs)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        bm.allocate(seq, seq.num_computed_tokens + num_new)
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            if self._waits_for_parent(seq):
                skipped.append(seq)
                continue
            if not seq.block_table:
                bm.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_allocate(seq, seq.num_computed_tokens + num_new):
                if bm.enable_prefix_caching:      # not admitted: the lookup is retried, count it once
                    bm.prefix_queries -= seq.num_tokens
                    bm.prefix_hits -= seq.num_computed_tokens
                bm.free(seq)
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            bm.allocate(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _waits_for_parent(self, seq: Sequence) -> bool:
        parent = seq.prefix_parent
        if parent is None or not self.block_manager.enable_prefix_caching:
            return False
        if parent.is_finished or parent.num_committed_tokens >= parent.num_prompt_tokens:
            seq.prefix_parent = None          # parent's prompt blocks are in the prefix cache now
            return False
        return True

    # -- after the model ran ---------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, results: list[SampleResult | None]) -> None:
        """Advance computed counts, register full blocks, append sampled tokens, finish by length/EOS."""
        for i, seq in enumerate(batch.seqs):
            if seq.is_finished:
                continue
            prev = seq.num_computed_tokens
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.block_manager.commit(seq, prev)
            result = results[i]
            if result is None:
                continue
            seq.append_token(result.token_id, result.logprob, result.top)
            self._check_finished(seq, result.token_id)

    def _check_finished(self, seq: Sequence, token_id: int, num_tokens: int | None = None) -> None:
        """Finish `seq` if `token_id`, its token number `num_tokens` (default: its newest), ends it."""
        params = seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self.finish(seq, "stop")
        elif token_id in params.stop_token_ids:
            seq.stop_reason = token_id
            self.finish(seq, "stop")
        elif self._ends_by_length(seq, seq.num_tokens if num_tokens is None else num_tokens):
            self.finish(seq, "length")

    def check_finished(self, seq: Sequence, token_id: int, num_tokens: int) -> None:
        """Overlapped scheduling: `token_id` resolved a step late, at token number `num_tokens`."""
        self._check_finished(seq, token_id, num_tokens)

    def _ends_by_length(self, seq: Sequence, num_tokens: int) -> bool:
        max_tokens = seq.params.max_tokens
        if max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens:
            return True
        return num_tokens >= self.config.max_model_len
