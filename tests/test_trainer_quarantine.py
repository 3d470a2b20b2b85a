"""Fault isolation in the online trainer (issue 15), in-process with injected faults: a step that fails
for one rating is bisected, that rating quarantined (durably, with reason and error), the others trained,
training not paused; device OOM halves the step first; a failure that is not a rating's (the probe step
fails too) or too many quarantines in a row pause training and quarantine nothing more; a quarantined
rating stays quarantined across a restart until retried."""
from __future__ import annotations

import contextlib
import sqlite3
import time

import pytest
import torch

from store.feedback_store import CompletionRecord
from tests.test_online_trainer import Rig
from trainer import online


def inject(monkeypatch, fails) -> list[list]:
    """Make the trainer's forward_backward raise `fails(records)` (an exception, or None to run it);
    returns the keys of the records of every call, in order (the probe's record has key None)."""
    real, calls = online.forward_backward, []

    def forward_backward(model, records, *args, **kwargs):
        calls.append([r.key for r in records])
        err = fails(records)
        if err is not None:
            raise err
        return real(model, records, *args, **kwargs)
    monkeypatch.setattr(online, "forward_backward", forward_backward)
    return calls


def key(record: CompletionRecord) -> tuple[str, int]:
    return record.response_id, record.choice_index


def status_of(rig: Rig, record: CompletionRecord):
    """The feedback row of a served choice (Rig's ratings have no API key)."""
    with contextlib.closing(sqlite3.connect(rig.store.path)) as conn:
        [(feedback_id,)] = conn.execute("SELECT feedback_id FROM feedback WHERE response_id=? AND choice_index=?",
                                        (record.response_id, record.choice_index)).fetchall()
    return rig.store.get_feedback(feedback_id, None)


def poisoned_by(bad: set, error=lambda: RuntimeError("poisoned record")):
    return lambda records: error() if any(r.key in bad for r in records) else None


def test_a_rating_whose_step_raises_is_quarantined_and_the_others_train(tmp_path, monkeypatch):
    rig = Rig(tmp_path, checkpoint_every=1)
    served = rig.serve(4)
    rig.rate(served)
    calls = inject(monkeypatch, poisoned_by({key(served[1])}))
    assert rig.step()
    trainer = rig.trainer
    assert not trainer.paused and trainer.last_error is None
    bad = status_of(rig, served[1])
    assert (bad.status, bad.quarantine_reason) == ("quarantined", "error")
    assert bad.quarantine_error == "RuntimeError: poisoned record"
    assert dict(trainer.quarantine.counts) == {"error": 1}
    # bisected: [0 1 2 3] fails, [0 1] fails, [0] trains, [1] fails alone, the probe runs, [2 3] trains
    assert calls == [[key(r) for r in served], [key(served[0]), key(served[1])], [key(served[0])],
                     [key(served[1])], [None], [key(served[2]), key(served[3])]]
    assert trainer.totals["steps"] == 2 and trainer.version == 2 and rig.engine.adapter_version == 2
    assert {status_of(rig, r).status for r in served if r is not served[1]} == {"trained"}   # checkpointed
    assert trainer.pending_count() == 0 and rig.engine.activation_pool.get(key(served[1])) is None
    assert not rig.step()                                            # nothing left: not retried
    s = trainer.status()
    assert s["quarantined_feedback"] == 1 and s["quarantine"]["since_start"] == {"error": 1}
    assert s["quarantine"]["recent"][0]["feedback_id"] == bad.feedback_id


def test_device_oom_halves_the_step_then_quarantines_a_rating_that_still_ooms_alone(tmp_path, monkeypatch):
    rig = Rig(tmp_path, checkpoint_every=1)
    served = rig.serve(4)
    rig.rate(served)
    oom = lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    too_big = lambda records: oom() if len(records) > 2 else poisoned_by({key(served[0])}, oom)(records)
    calls = inject(monkeypatch, too_big)
    assert rig.step() and not rig.trainer.paused
    bad = status_of(rig, served[0])
    assert (bad.status, bad.quarantine_reason) == ("quarantined", "oom") and "out of memory" in bad.quarantine_error
    assert rig.trainer.totals["steps"] == 2 and len(calls) == 6          # halves of 2 and 1 fit
    assert {status_of(rig, r).status for r in served[1:]} == {"trained"}
    assert dict(rig.trainer.quarantine.counts) == {"oom": 1}


def test_a_failure_that_is_not_a_ratings_pauses_training_and_quarantines_nothing(tmp_path, monkeypatch):
    """Every step fails, the probe's too: the trainer is at fault. Training pauses, every rating stays
    pending and pinned, and after resume they train."""
    rig = Rig(tmp_path)
    served = rig.serve(3)
    rig.rate(served)
    calls = inject(monkeypatch, lambda records: RuntimeError("device lost"))
    assert not rig.step()
    assert rig.trainer.paused and rig.trainer.last_error == "RuntimeError: device lost"
    assert calls[-1] == [None] and rig.store.count_feedback("quarantined") == 0
    assert rig.trainer.pending_count() == 3 and rig.trainer.read_seq == 0
    assert all(rig.engine.activation_pool.get(key(r)).pinned for r in served)
    monkeypatch.undo()
    rig.trainer.resume()
    assert rig.step() and rig.trainer.version == 1 and rig.trainer.totals["outcome_hit"] == 3


def test_too_many_quarantines_in_a_row_pause_training_and_a_halted_step_trains_nothing_twice(tmp_path, monkeypatch):
    """max_consecutive_quarantines=1 (sft): the bad rating's quarantine halts the step; the rating not
    reached stays pending and trains after resume; the bad-rated one (nothing for sft to learn, done
    before the bisection) is not taken again."""
    rig = Rig(tmp_path, objective="sft", max_consecutive_quarantines=1)
    served = rig.serve(3)
    rig.rate(served, [1, 1, -1])
    calls = inject(monkeypatch, poisoned_by({key(served[0])}))
    assert not rig.step()
    trainer = rig.trainer
    assert trainer.paused and "max_consecutive_quarantines" in trainer.last_error
    assert status_of(rig, served[0]).status == "quarantined"
    assert trainer.read_seq == status_of(rig, served[0]).seq                   # the next one is read again
    assert trainer.pending_count() == 1                                        # served[1]; [2] is done
    trainer.resume()
    calls.clear()
    assert rig.step() and calls == [[key(served[1])]]
    trainer.checkpoint()
    assert [status_of(rig, r).status for r in served] == ["quarantined", "trained", "trained"]


def test_a_rating_past_the_context_is_quarantined_without_running_a_step(tmp_path, monkeypatch):
    """Stored before POST /feedback checked it: its record is never run (on CUDA, positions past the
    rotary table are a device-side assert that breaks serving too)."""
    rig = Rig(tmp_path)
    limit = rig.trainer.max_positions
    long_one = CompletionRecord("chatcmpl-long", 0, list(range(3, limit + 3)), [5, 6], [-1.0, -1.0], 0, None,
                                time.time())
    rig.store.record_completions([long_one])
    good = rig.serve(1)
    rig.rate([long_one] + good)
    calls = inject(monkeypatch, lambda records: None)
    assert rig.step() and calls == [[key(good[0])]]
    row = status_of(rig, long_one)
    assert (row.status, row.quarantine_reason) == ("quarantined", "too_long") and str(limit) in row.quarantine_error
    assert rig.trainer.quarantine.in_a_row == 0                  # knowable, not a failure: no pause counts it


def test_the_quarantine_holds_across_a_restart_until_retried(tmp_path, monkeypatch):
    rig = Rig(tmp_path, checkpoint_every=1)
    poisoned = rig.serve(1)
    rig.rate(poisoned)
    inject(monkeypatch, poisoned_by({key(poisoned[0])}))
    assert rig.step() and status_of(rig, poisoned[0]).status == "quarantined"
    monkeypatch.undo()                                           # the fault is gone, the row stays
    rig.restart()
    assert not rig.step() and status_of(rig, poisoned[0]).status == "quarantined"
    good = rig.serve(1)
    rig.rate(good)
    assert rig.step() and rig.trainer.version == 1 and status_of(rig, good[0]).status == "trained"
    retried = rig.store.retry_quarantined(status_of(rig, poisoned[0]).feedback_id)
    assert retried.seq > rig.trainer.read_seq
    rig.trainer.wake()
    assert rig.step() and rig.trainer.version == 2 and status_of(rig, poisoned[0]).status == "trained"


@pytest.mark.parametrize("value", [0, -3])
def test_max_consecutive_quarantines_is_validated(value):
    from common.errors import ConfigError
    from trainer.config import TrainerConfig
    with pytest.raises(ConfigError, match="max_consecutive_quarantines"):
        TrainerConfig(max_consecutive_quarantines=value)
    assert TrainerConfig(max_consecutive_quarantines=None).max_consecutive_quarantines is None
