"""training.concurrency=thread (the default on CUDA), here on the CPU: the trainer thread trains while
the engine thread keeps stepping; a new version is offered by the trainer and goes live only at an
engine step boundary (`LLMEngine.apply_adapter_offer`, no trainer hook in this mode); rows of a step's records are pinned while it
reads them; rollback and failures behave as in interleaved mode."""
from __future__ import annotations

import time

import pytest

from tests.test_online_trainer import Rig, same


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def rig(tmp_path):
    rig = Rig(tmp_path, concurrency="thread", min_records_per_step=2, max_wait_s=600.0)   # steps of 2+
    yield rig
    rig.trainer.stop()


def test_thread_trains_and_the_version_goes_live_only_at_an_engine_step_boundary(rig):
    assert rig.trainer.thread is not None
    records = rig.serve(3)
    before = rig.serving()
    rig.rate(records)
    rig.trainer.start()
    assert wait_for(lambda: rig.trainer.totals["steps"] == 1 and rig.trainer.version == 1)
    assert rig.trainer.totals["outcome_hit"] == 3              # reused while another thread could step
    assert rig.published == [1]                                # offered, but not live ...
    assert rig.engine.adapter_version == 0 and same(before, rig.serving())
    assert rig.engine.apply_adapter_offer() == 1               # ... until the engine's step boundary
    assert rig.engine.adapter_version == 1 and same(rig.serving(), rig.masters())
    assert rig.serve(2)[0].adapter_version == 1                # served (and recorded) with version 1


def test_engine_keeps_stepping_while_the_thread_trains(rig):
    rig.trainer.start()
    for _ in range(3):                                         # rate, then serve more at once
        rig.rate(rig.serve(2))
        rig.serve(2)
        rig.engine.apply_adapter_offer()
    assert wait_for(lambda: rig.trainer.totals["steps"] >= 1 and not rig.store.pending_feedback(rig.trainer.read_seq, 1))
    rig.engine.apply_adapter_offer()
    assert rig.engine.adapter_version == rig.trainer.version >= 1
    assert rig.trainer.last_error is None


def test_a_step_pins_the_records_it_reads(tmp_path):
    rig = Rig(tmp_path, concurrency="thread")
    records = rig.serve(2)
    for rec in records:                                        # ratings written without pinning
        rig.store.add_feedback(response_id=rec.response_id, choice_index=rec.choice_index, rating=1)
    pool = rig.engine.activation_pool
    keys = [(r.response_id, r.choice_index) for r in records]
    assert not any(pool.get(k).pinned for k in keys)
    taken = rig.trainer._take(rig.store.pending_feedback(0, 16))
    assert [w.record.key for w in taken] == keys and all(pool.get(k).pinned for k in keys)


def test_rollback_and_failure_in_thread_mode(rig, monkeypatch):
    rig.trainer.start()
    rig.rate(rig.serve(2))
    assert wait_for(lambda: rig.trainer.version == 1)
    rig.engine.apply_adapter_offer()
    serving_v1 = rig.serving()
    rig.rate(rig.serve(2))
    assert wait_for(lambda: rig.trainer.version == 2)
    rig.engine.apply_adapter_offer()
    rig.trainer.request_activate(1)
    assert wait_for(lambda: rig.trainer.pending_activation is None and rig.trainer.version == 1)
    rig.engine.apply_adapter_offer()
    assert rig.engine.adapter_version == 1 and same(rig.serving(), serving_v1)
    monkeypatch.setattr(rig.trainer, "_work", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert wait_for(lambda: rig.trainer.paused)                # a failure pauses; serving goes on
    assert "boom" in rig.trainer.last_error
    assert rig.trainer.stop(timeout=10)


def test_a_step_waits_at_layer_boundaries_while_the_engine_computes_a_long_prompt(tmp_path):
    rig = Rig(tmp_path, concurrency="thread", min_records_per_step=2, max_wait_s=600.0, yield_prefill_tokens=256)
    try:
        _waits_while_a_long_prompt_runs(rig)
    finally:
        rig.trainer.stop()


def _waits_while_a_long_prompt_runs(rig):
    records = rig.serve(2)
    rig.engine.step_signal.begin(rig.config.yield_prefill_tokens)      # as LLMEngine.step does for such a step
    rig.rate(records)
    rig.trainer.start()
    assert wait_for(lambda: rig.trainer.lock.locked(), timeout=10)     # the step began ...
    time.sleep(0.5)
    assert rig.trainer.totals["steps"] == 0                            # ... and waits before its first layer
    rig.engine.step_signal.end()
    assert wait_for(lambda: rig.trainer.totals["steps"] == 1)
    records = rig.serve(2)
    rig.engine.step_signal.begin(rig.config.yield_prefill_tokens - 1)  # a shorter prompt: no wait
    rig.rate(records)
    assert wait_for(lambda: rig.trainer.totals["steps"] == 2)
    rig.engine.step_signal.end()


def test_the_latency_budget_sees_every_serving_step_and_paces_the_thread(rig):
    budget = rig.trainer.thread.budget
    assert budget is not None and rig.trainer._gate() is rig.trainer.thread.gate
    rig.trainer.start()                             # from now on the engine reports its steps
    records = rig.serve(3)
    assert len(budget.steps) > 0 or budget.baseline
    rig.rate(records)
    assert wait_for(lambda: rig.trainer.totals["steps"] == 1)
    assert budget.baseline                           # serving steps without training: baselines
    assert budget.status()["slo_ratio"] == rig.config.tbt_slo_ratio
    assert rig.trainer.stop(timeout=10) and not rig.engine.step_signal._observers   # unsubscribed
