"""Overlapped scheduling (`EngineConfig.overlap_scheduling`): the host schedules and prepares step N+1
while step N runs on the device, then reads step N's samples (its one host sync) and processes its
outputs, one step late.

State between calls: the step in flight. When step N+1 is launched, each sequence of step N looks as if
N had run: its computed count advanced and, where N samples, a PLACEHOLDER appended, which step N+1's
decode row reads on the device (engine/inflight.py). Reading step N then fills the placeholders in.

One step late, so: a sequence that ends by EOS, a stop token or a stop string may have been scheduled
once more; that token is dropped (never emitted) and its blocks are freed with the sequence's. Ends by
length are known beforehand, so such a sequence is not scheduled again (scheduler). Full blocks enter
the prefix cache when their tokens are all on the host (`Sequence.uncommitted_from`).

Synchronous steps (read right after launch, as without the flag): a step that records activation rows
(capture's `end` follows its kernels, and the next `begin` would reset its bookkeeping); and before
scheduling, the step in flight while a sequence that may be scheduled uses penalties (a batch with
one counts every row's tokens on the host).
"""
from __future__ import annotations

from engine.inflight import InFlightStep
from engine.output_processor import SeqDelta
from engine.scheduler import ScheduledBatch
from engine.sequence import PLACEHOLDER, Sequence, SequenceStatus


class OverlappedStepper:
    def __init__(self, engine):
        self.engine = engine                 # engine.llm_engine.LLMEngine
        self.inflight: InFlightStep | None = None
        self._signal_open = False            # step_signal.begin without its end yet

    def step(self) -> list[SeqDelta]:
        """Called by LLMEngine.step on the serving stream; deltas of the step(s) read in this call."""
        deltas = self._read() if self._sync_before_schedule() else []
        batch = self.engine.scheduler.schedule()
        launched = self._launch(batch) if not batch.is_empty else None
        deltas += self._read()                       # step N-1, while step N runs
        self.inflight = launched
        if launched is None or launched.capture is not None:
            deltas += self._read()                   # capture: a synchronous step (or none launched)
            self._signal(None)
        return deltas

    def _signal(self, batch: ScheduledBatch | None) -> None:
        """The step signal (a trainer thread yields to prompt tokens) spans from a step's launch to the
        next launch, or to its read when nothing follows it."""
        signal = self.engine.step_signal
        if self._signal_open:
            signal.end()
        self._signal_open = batch is not None
        if batch is not None:
            signal.begin(sum(n for n in batch.num_new_tokens if n > 1),
                         sum(1 for n in batch.num_new_tokens if n == 1))

    def _sync_before_schedule(self) -> bool:
        """Penalties count every token of each row of a batch that has one: none may be in flight."""
        if self.inflight is None:
            return False
        sched = self.engine.scheduler
        return any(s.params.needs_penalties for s in sched.running) or \
            any(s.params.needs_penalties for s in sched.waiting)

    def _launch(self, batch: ScheduledBatch) -> InFlightStep:
        e = self.engine
        self._signal(batch)
        try:
            capture = e.capture.begin(batch) if e.capture is not None else None
            step = e.runner.launch(batch, capture, self.inflight)
        except BaseException:
            self._signal(None)
            raise
        step.capture = capture
        for seq, n, sampled in zip(batch.seqs, batch.num_new_tokens, step.samples):
            if seq.uncommitted_from is None:
                seq.uncommitted_from = seq.num_computed_tokens
            seq.num_computed_tokens += n
            step.preemptions.append(seq.num_preemptions)
            step.token_pos.append(seq.num_tokens if sampled else None)
            if sampled:
                seq.token_ids.append(PLACEHOLDER)
        return step

    def _read(self) -> list[SeqDelta]:
        """Read the step in flight (its one host sync) and process its outputs."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        e = self.engine
        results = e.runner.wait(step)
        live = []
        for seq, pos, preemptions, result in zip(step.batch.seqs, step.token_pos, step.preemptions, results):
            if seq.is_finished:
                continue                     # aborted, or ended a step ago: this token is dropped
            if result is not None:
                seq.resolve_token(pos, result.token_id, result.logprob, result.top)
            self._commit(seq, preemptions)
            if result is not None:
                e.scheduler.check_finished(seq, result.token_id, pos + 1)
                live.append((seq, pos))
        if step.capture is not None:
            e.capture.end(e.adapter_version)
        return [self._output(seq, pos) for seq, pos in live]

    def _commit(self, seq: Sequence, preemptions: int) -> None:
        """Register the full blocks computed since `uncommitted_from`: their tokens are on the host now
        (a later step in flight may still be writing their KV; reads of them are ordered after it)."""
        if (seq.uncommitted_from is None or seq.status != SequenceStatus.RUNNING
                or seq.num_preemptions != preemptions):
            return
        self.engine.block_manager.commit(seq, seq.uncommitted_from)
        seq.uncommitted_from = None

    def _output(self, seq: Sequence, pos: int) -> SeqDelta:
        """The delta of `seq`'s token at `pos` (LLMEngine._process_outputs, for one resolved token)."""
        e = self.engine
        state = e._text_states[seq.seq_id]
        num_output = pos + 1 - seq.num_prompt_tokens
        new_ids = seq.output_token_ids[state.num_tokens_seen:num_output]
        text, stop = state.advance(seq.is_finished, num_output)
        if stop is not None and not seq.is_finished:
            seq.stop_reason = stop
            e.scheduler.finish(seq, "stop")
        if seq.is_finished:
            seq.drop_unresolved()            # a token of a step launched after it ended
            seq.trim_adapter_versions(num_output)   # a version live after its last token
        new_logprobs = seq.top_logprobs[-len(new_ids):] if seq.params.logprobs is not None else []
        delta = SeqDelta(seq.request_id, seq.index, new_ids, text, new_logprobs,
                         seq.finish_reason, seq.stop_reason, seq)
        if seq.is_finished:
            e._finish_bookkeeping(seq)
        return delta
