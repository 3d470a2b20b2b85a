"""The feedback store's schema v2 (issue 15): the in-place migration of a v1 database, the `reward`
score, and the quarantine (quarantine / list / retry / drop, durable across reopening)."""
from __future__ import annotations

import contextlib
import math
import sqlite3

import pytest

from common.errors import InvalidRequestError, NotFoundError
from store import feedback_schema
from store.feedback_records import pack
from store.feedback_store import SCHEMA_VERSION, FeedbackStore
from tests.test_feedback_store import make_records

# the schema as bac67a4 created it (version 1)
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE completions (
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    prompt_token_ids BLOB NOT NULL, response_token_ids BLOB NOT NULL, logprobs BLOB NOT NULL,
    adapter_version INTEGER NOT NULL, api_key_id TEXT, created REAL NOT NULL,
    finish_reason TEXT, model TEXT,
    PRIMARY KEY (response_id, choice_index));
CREATE INDEX completions_created ON completions (created);
CREATE TABLE feedback (
    feedback_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    rating INTEGER, stars INTEGER, comment TEXT, better_response TEXT, api_key_id TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, status TEXT NOT NULL,
    UNIQUE (response_id, choice_index),
    FOREIGN KEY (response_id, choice_index) REFERENCES completions (response_id, choice_index));
CREATE INDEX feedback_status_seq ON feedback (status, seq);
INSERT INTO meta VALUES ('schema_version', 1);
INSERT INTO meta VALUES ('last_seq', 2);
"""


def _v1_database(path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(V1_SCHEMA)
        for i in range(2):
            conn.execute("INSERT INTO completions VALUES (?,?,?,?,?,?,?,?,?,?)",
                         ("chatcmpl-old", i, pack([1, 2, 3], "i"), pack([4, 5], "i"), pack([-0.5, -1.0], "d"),
                          3, "key-a", 100.0, "stop", "m"))
        conn.execute("INSERT INTO feedback VALUES ('fb-a', 1, 'chatcmpl-old', 0, 1, NULL, 'ok', NULL, 'key-a', "
                     "100.0, 100.0, 'trained')")
        conn.execute("INSERT INTO feedback VALUES ('fb-b', 2, 'chatcmpl-old', 1, NULL, 2, NULL, 'better', 'key-a', "
                     "101.0, 101.0, 'pending')")
        conn.commit()


def test_a_v1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.db"
    _v1_database(path)
    store = FeedbackStore(path)
    try:
        trained = store.get_feedback("fb-a", "key-a")
        assert (trained.rating, trained.comment, trained.status, trained.reward_value) == (1, "ok", "trained", None)
        [(pending, completion)] = store.pending_feedback()
        assert pending.feedback_id == "fb-b" and pending.stars == 2 and pending.better_response == "better"
        assert pending.reward() == -1.0 and completion.response_token_ids == [4, 5]
        assert completion.adapter_versions == ((0, completion.adapter_version),)  # v1: one version
        assert store.quarantine(pending.seq, "error", "IndexError: boom")         # the new columns work
        assert store.quarantined()[0].quarantine_error == "IndexError: boom"
        store.record_completions(make_records("chatcmpl-new", 1))
        fb, _ = store.add_feedback(response_id="chatcmpl-new", choice_index=0, reward=0.25, api_key_id="key-a")
        assert fb.seq == 3 and fb.reward_value == 0.25                          # the seq counter carried over
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == SCHEMA_VERSION
    FeedbackStore(path).close()                                                  # a migrated database reopens


def test_a_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "v1.db"
    _v1_database(path)
    monkeypatch.setitem(feedback_schema._MIGRATIONS, 1,
                        ("ALTER TABLE feedback ADD COLUMN reward REAL", "ALTER TABLE nowhere ADD COLUMN x"))
    with pytest.raises(sqlite3.OperationalError):
        FeedbackStore(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == 1
        assert "reward" not in [c[1] for c in conn.execute("PRAGMA table_info(feedback)")]


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "fb.db")
    s.record_completions(make_records("chatcmpl-1", 3))
    yield s
    s.close()


@pytest.mark.parametrize("reward", [-1, 1, 0, 0.5, -0.75, 1.0])
def test_reward_is_stored_and_is_the_records_reward(store, reward):
    fb, _ = store.add_feedback(response_id="chatcmpl-1", choice_index=0, reward=reward, api_key_id="key-a")
    got = store.get_feedback(fb.feedback_id, "key-a")
    assert got.reward_value == reward and isinstance(got.reward_value, float) and got.reward() == reward
    assert got.rating is None and got.stars is None and got.to_public_dict()["reward"] == reward


@pytest.mark.parametrize("kwargs, param", [
    ({"reward": 1.01}, "reward"), ({"reward": -2}, "reward"), ({"reward": math.nan}, "reward"),
    ({"reward": math.inf}, "reward"), ({"reward": True}, "reward"), ({"reward": "0.5"}, "reward"),
    ({"reward": 0.5, "rating": 1}, "rating"), ({"reward": 0.5, "stars": 4}, "rating"),
])
def test_invalid_reward(store, kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        store.add_feedback(response_id="chatcmpl-1", choice_index=0, api_key_id="key-a", **kwargs)
    assert err.value.param == param and store.count_feedback() == 0


def _rate_all(store) -> list:
    return [store.add_feedback(response_id="chatcmpl-1", choice_index=i, rating=1, api_key_id="key-a")[0]
            for i in range(3)]


def test_quarantine_is_skipped_listed_and_survives_reopening(store, tmp_path):
    first, second, third = _rate_all(store)
    assert store.quarantine(second.seq, "error", "IndexError: index 8192 is out of bounds " + "x" * 5000)
    assert not store.quarantine(second.seq, "error", "again")              # no longer pending: nothing
    assert [f.seq for f, _ in store.pending_feedback()] == [first.seq, third.seq]
    assert store.count_feedback("quarantined") == 1
    store.close()
    reopened = FeedbackStore(tmp_path / "fb.db")
    try:
        [listed] = reopened.quarantined()
        shown = listed.to_quarantine_dict()
        assert (shown["feedback_id"], shown["id"], shown["choice_index"], shown["reason"]) == \
            (second.feedback_id, "chatcmpl-1", 1, "error")
        assert shown["error"].startswith("IndexError: index 8192") and len(shown["error"]) == 1000
        assert shown["quarantined_at"] >= second.created and shown["status"] == "quarantined"
        assert reopened.get_feedback(second.feedback_id, "key-a").status == "quarantined"
        reopened.mark_trained([second.seq])                                   # a checkpoint never un-quarantines
        assert reopened.get_feedback(second.feedback_id, "key-a").status == "quarantined"
    finally:
        reopened.close()


def test_retry_gives_a_new_seq_and_drop_keeps_the_row(store):
    first, second, third = _rate_all(store)
    store.quarantine(first.seq, "oom", "OutOfMemoryError")
    store.quarantine(second.seq, "error", "ValueError")
    retried = store.retry_quarantined(first.feedback_id)
    assert retried.status == "pending" and retried.seq > third.seq and retried.quarantine_reason is None
    assert [f.feedback_id for f, _ in store.pending_feedback(after_seq=third.seq)] == [first.feedback_id]
    dropped = store.drop_quarantined(second.feedback_id)
    assert dropped.status == "dropped" and store.quarantined() == []
    assert store.get_feedback(second.feedback_id, "key-a").status == "dropped"
    for call in (store.retry_quarantined, store.drop_quarantined):
        for feedback_id in ("fb-unknown", first.feedback_id, second.feedback_id, third.feedback_id):
            with pytest.raises(NotFoundError):                                # only a quarantined one
                call(feedback_id)


def test_a_replaced_rating_leaves_the_quarantine(store):
    first, _, _ = _rate_all(store)
    store.quarantine(first.seq, "error", "boom")
    new, created = store.add_feedback(response_id="chatcmpl-1", choice_index=0, reward=-0.5, replace=True,
                                      api_key_id="key-a")
    assert not created and new.status == "pending" and new.seq > first.seq
    assert (new.rating, new.reward_value, new.quarantine_reason, new.quarantine_error) == (None, -0.5, None, None)
    assert store.quarantined() == []
