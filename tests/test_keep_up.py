"""KeepUp: the rated backlog past the trainer's watermark (ratings, tokens, oldest age) read from a real
FeedbackStore in one indexed query, and trained tokens per second over a sliding window (fake clock)."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from store.feedback_store import CompletionRecord, FeedbackStore
from trainer.keep_up import KeepUp


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(tmp_path / "fb.db")
    try:
        yield s
    finally:
        s.close()


def served(store, response_id: str, prompt_len: int, response_len: int, created: float = 1000.0) -> None:
    store.record_completions([CompletionRecord(response_id, 0, list(range(1, prompt_len + 1)),
                                               list(range(response_len)), [-0.5] * response_len, 0, None,
                                               created)])


def rate(store, response_id: str, **fields):
    return store.add_feedback(response_id=response_id, choice_index=0, **fields)[0]


def test_empty_backlog_and_no_training(store):
    clock = FakeClock(5.0)
    keep_up = KeepUp(store, window_s=60.0, clock=clock)
    clock.now = 15.0
    assert keep_up.snapshot(0) == {"backlog_ratings": 0, "backlog_tokens": 0, "oldest_pending_s": 0.0,
                                   "trained_tok_s": 0.0}


def test_backlog_counts_pending_ratings_past_the_watermark(store):
    served(store, "a", 3, 5)
    served(store, "b", 7, 2)
    served(store, "c", 4, 4)
    served(store, "d", 10, 1)
    first = rate(store, "a", rating=1)                                  # seq 1: already read
    second = rate(store, "b", rating=-1)                                # seq 2
    third = rate(store, "c", stars=5, better_response="abcdefghi")      # seq 3: 9 bytes -> 3 tokens
    fourth = rate(store, "d", reward=0.5)                               # seq 4: quarantined below
    assert store.quarantine(fourth.seq, "error", "boom")
    wall = FakeClock(third.updated + 42.0)
    keep_up = KeepUp(store, wall_clock=wall)
    snap = keep_up.snapshot(first.seq)
    assert snap["backlog_ratings"] == 2
    # b: 7 + 2; c: 4 + 4, and its better answer: the prompt again (4) + ceil(9 / 4) = 3
    assert snap["backlog_tokens"] == 9 + 8 + 4 + 3
    assert snap["oldest_pending_s"] == pytest.approx(wall.now - second.updated)
    store.mark_trained([second.seq])
    snap = keep_up.snapshot(first.seq)
    assert (snap["backlog_ratings"], snap["backlog_tokens"]) == (1, 15)
    assert snap["oldest_pending_s"] == pytest.approx(42.0)
    assert keep_up.snapshot(third.seq)["backlog_ratings"] == 0


def test_a_replaced_rating_is_as_old_as_its_replacement(store):
    served(store, "a", 2, 2)
    original = rate(store, "a", rating=1)
    replaced, _ = store.add_feedback(response_id="a", choice_index=0, rating=-1, replace=True)
    assert replaced.seq > original.seq and replaced.updated >= original.updated
    keep_up = KeepUp(store, wall_clock=FakeClock(replaced.updated + 1.0))
    snap = keep_up.snapshot(original.seq)                   # the replacement is past the old watermark
    assert snap["backlog_ratings"] == 1 and snap["oldest_pending_s"] == pytest.approx(1.0)
    assert keep_up.snapshot(0)["backlog_tokens"] == 4       # one row, counted once


def test_age_is_never_negative(store):
    served(store, "a", 1, 1)
    fb = rate(store, "a", rating=1)
    assert KeepUp(store, wall_clock=FakeClock(fb.updated - 5.0)).snapshot(0)["oldest_pending_s"] == 0.0


def test_backlog_is_one_indexed_query(store):
    served(store, "a", 2, 2)
    rate(store, "a", rating=1)
    statements = []
    store._conn.set_trace_callback(statements.append)
    KeepUp(store).snapshot(0)
    store._conn.set_trace_callback(None)
    assert len(statements) == 1 and statements[0].startswith("SELECT"), statements
    plan = store._query("EXPLAIN QUERY PLAN " + statements[0])
    details = " ".join(row[-1] for row in plan)
    assert "feedback_status_seq" in details and "SCAN" not in details, details


def test_trained_tokens_per_second_over_a_sliding_window(store):
    clock = FakeClock(100.0)
    keep_up = KeepUp(store, window_s=60.0, clock=clock)
    clock.now = 110.0
    keep_up.trained(200)
    assert keep_up.trained_tok_s() == pytest.approx(20.0)     # 10 s since start: shorter than the window
    clock.now = 150.0
    keep_up.trained(400)
    assert keep_up.trained_tok_s() == pytest.approx(600 / 50)
    clock.now = 200.0                                          # window (140, 200]: the 200 at 110 left it
    assert keep_up.snapshot(0)["trained_tok_s"] == pytest.approx(400 / 60)
    clock.now = 210.0                                          # window (150, 210]: empty
    assert keep_up.trained_tok_s() == 0.0
    keep_up.trained(0)
    assert keep_up.trained_tok_s() == 0.0


@pytest.mark.parametrize("tokens", [-1, 1.5, True, None])
def test_trained_refuses_what_is_not_a_token_count(store, tokens):
    with pytest.raises(ValueError):
        KeepUp(store).trained(tokens)


@pytest.mark.parametrize("window_s", [0, -1.0, float("nan")])
def test_window_must_be_positive(store, window_s):
    with pytest.raises(ConfigError):
        KeepUp(store, window_s=window_s)


def test_a_closed_store_raises_runtime_error(tmp_path):
    s = FeedbackStore(tmp_path / "fb.db")
    keep_up = KeepUp(s)
    s.close()
    with pytest.raises(RuntimeError):
        keep_up.snapshot(0)


def gauges(state) -> dict[str, float]:
    names = {"alchemist_feedback_backlog_tokens", "alchemist_feedback_oldest_pending_seconds",
             "alchemist_train_tokens_per_second", "alchemist_training_paused"}
    out = {}
    for family in state.metrics.registry.collect():
        for sample in family.samples:
            if sample.name in names:
                assert sample.labels == {"model_name": state.model_name}
                out[sample.name] = sample.value
    return out


def test_gauges_with_training_off_count_every_pending_rating(tiny_model, tmp_path):
    from server.testing import tiny_state
    state = tiny_state(tiny_model, tmp_path / "off.db")
    try:
        assert gauges(state) == {"alchemist_feedback_backlog_tokens": 0.0,
                                 "alchemist_feedback_oldest_pending_seconds": 0.0,
                                 "alchemist_train_tokens_per_second": 0.0, "alchemist_training_paused": 0.0}
        served(state.store, "a", 6, 3, created=0.0)
        rate(state.store, "a", rating=1)
        values = gauges(state)
        assert values["alchemist_feedback_backlog_tokens"] == 9.0
        assert 0.0 <= values["alchemist_feedback_oldest_pending_seconds"] < 60.0
    finally:
        state.close()
    assert gauges(state)["alchemist_feedback_backlog_tokens"] == 0.0        # a closed store: zeros


def test_paused_gauge_follows_the_trainer(tiny_model, tmp_path):
    from server.testing import tiny_state
    from trainer.config import TrainerConfig
    state = tiny_state(tiny_model, tmp_path / "on.db", training=TrainerConfig(lora_rank=4))
    try:
        assert gauges(state)["alchemist_training_paused"] == 0.0
        state.trainer.pause()
        assert gauges(state)["alchemist_training_paused"] == 1.0
        state.trainer.resume()
        assert gauges(state)["alchemist_training_paused"] == 0.0
        keep_up = getattr(state.trainer, "keep_up", None)
        if keep_up is not None:                  # wired by trainer/online.py: its steps feed the rate
            keep_up.trained(600)
            assert gauges(state)["alchemist_train_tokens_per_second"] > 0.0
    finally:
        state.close()
