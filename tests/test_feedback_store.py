"""Tests for store.feedback_store: validation, durability, concurrency, training watermark."""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError
from store.feedback_records import MAX_TEXT_BYTES, CompletionRecord, Feedback
from store.feedback_store import SCHEMA_VERSION, FeedbackStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_records(response_id: str = "chatcmpl-1", n: int = 2, key: str | None = "key-a",
                 created: float | None = None) -> list[CompletionRecord]:
    created = time.time() if created is None else created
    return [CompletionRecord(response_id=response_id, choice_index=i, prompt_token_ids=[1, 2, 3],
                             response_token_ids=[10 + i, 20, 30], logprobs=[-0.5, -1.25, -0.0625],
                             adapter_version=7, api_key_id=key, created=created,
                             finish_reason="stop", model="m") for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "sub" / "dir" / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def seeded(store):
    store.record_completions(make_records())
    return store


def test_creates_parent_dirs_wal_and_schema(tmp_path):
    path = tmp_path / "a" / "b" / "fb.db"
    FeedbackStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def test_completion_roundtrip_and_num_choices(seeded):
    rec = seeded.get_completion("chatcmpl-1", 1)
    assert rec == make_records(created=rec.created)[1]
    assert seeded.num_choices("chatcmpl-1") == 2
    assert seeded.num_choices("nope") == 0
    assert seeded.get_completion("chatcmpl-1", 5) is None


def test_duplicate_completion_conflicts_and_rolls_back(seeded):
    with pytest.raises(ConflictError):
        seeded.record_completions(make_records("cmpl-2", 1) + make_records("chatcmpl-1", 1))
    assert seeded.num_choices("cmpl-2") == 0


def test_logprob_length_mismatch_rejected(store):
    bad = CompletionRecord("cmpl-x", 0, [1], [2, 3], [-1.0], 0, None, time.time())
    with pytest.raises(ValueError):
        store.record_completions([bad])


def test_add_feedback_creates_pending_row(seeded):
    fb, created = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                                      comment="nice", api_key_id="key-a")
    assert created and fb.status == "pending" and fb.seq == 1
    assert fb.feedback_id.startswith("fb-") and len(fb.feedback_id) == 35
    assert seeded.get_feedback(fb.feedback_id, api_key_id="key-a") == fb
    assert fb.to_public_dict() == {
        "feedback_id": fb.feedback_id, "id": "chatcmpl-1", "choice_index": 0, "rating": 1,
        "stars": None, "reward": None, "comment": "nice", "better_response": None, "status": "pending",
        "created": fb.created}


@pytest.mark.parametrize("kwargs, param", [
    ({}, "rating"),
    ({"rating": 1, "stars": 5}, "rating"),
    ({"rating": 0}, "rating"),
    ({"rating": 2}, "rating"),
    ({"rating": True}, "rating"),
    ({"rating": 1.0}, "rating"),
    ({"stars": 0}, "stars"),
    ({"stars": 6}, "stars"),
    ({"stars": True}, "stars"),
    ({"stars": 4.0}, "stars"),
    ({"rating": 1, "comment": "x" * (MAX_TEXT_BYTES + 1)}, "comment"),
    ({"rating": 1, "better_response": "é" * (MAX_TEXT_BYTES // 2 + 1)}, "better_response"),
    ({"rating": 1, "comment": 5}, "comment"),
])
def test_invalid_scores_and_text(seeded, kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, api_key_id="key-a", **kwargs)
    assert err.value.param == param


def test_text_at_limit_accepted(seeded):
    fb, _ = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, stars=3,
                                comment="x" * MAX_TEXT_BYTES, api_key_id="key-a")
    assert len(fb.comment) == MAX_TEXT_BYTES


def test_unknown_and_foreign_ids_give_identical_not_found(seeded):
    with pytest.raises(NotFoundError) as unknown:
        seeded.add_feedback(response_id="chatcmpl-zzz", choice_index=0, rating=1,
                            api_key_id="key-a")
    with pytest.raises(NotFoundError) as other_key:
        seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                            api_key_id="key-b")
    with pytest.raises(NotFoundError):
        seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1)  # no key
    assert unknown.value.message == "No completion with id 'chatcmpl-zzz'."
    assert other_key.value.message == "No completion with id 'chatcmpl-1'."
    assert unknown.value.status_code == other_key.value.status_code == 404


def test_auth_off_matches_none_key(store):
    store.record_completions(make_records("cmpl-open", 1, key=None))
    fb, created = store.add_feedback(response_id="cmpl-open", choice_index=0, stars=5)
    assert created and fb.api_key_id is None
    assert store.get_feedback(fb.feedback_id) == fb


@pytest.mark.parametrize("index", [-1, 2, 99, True, "0"])
def test_choice_index_out_of_range(seeded, index):
    with pytest.raises(InvalidRequestError) as err:
        seeded.add_feedback(response_id="chatcmpl-1", choice_index=index, rating=1,
                            api_key_id="key-a")
    assert err.value.param == "choice_index"


def test_duplicate_feedback_conflicts_without_replace(seeded):
    seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1, api_key_id="key-a")
    with pytest.raises(ConflictError) as err:
        seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=-1,
                            api_key_id="key-a")
    assert '"replace": true' in err.value.message and err.value.status_code == 409
    assert seeded.count_feedback() == 1


def test_replace_keeps_id_new_seq_and_pending(seeded):
    first, _ = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                                   comment="a", api_key_id="key-a")
    seeded.add_feedback(response_id="chatcmpl-1", choice_index=1, rating=1, api_key_id="key-a")
    seeded.mark_trained([first.seq])
    assert seeded.get_feedback(first.feedback_id, "key-a").status == "trained"
    time.sleep(0.01)
    new, created = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, stars=2,
                                       better_response="b", replace=True, api_key_id="key-a")
    assert not created
    assert new.feedback_id == first.feedback_id and new.seq == 3 and new.status == "pending"
    assert (new.rating, new.stars, new.comment, new.better_response) == (None, 2, None, "b")
    assert new.created == first.created and new.updated > first.updated
    assert seeded.count_feedback() == 2


def test_mark_trained_ignores_seq_replaced_since_read(seeded):
    fb, _ = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                                api_key_id="key-a")
    batch = seeded.pending_feedback()
    seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=-1, replace=True,
                        api_key_id="key-a")
    seeded.mark_trained([f.seq for f, _ in batch])
    assert seeded.get_feedback(fb.feedback_id, "key-a").status == "pending"


def test_get_feedback_unknown_or_foreign(seeded):
    fb, _ = seeded.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                                api_key_id="key-a")
    with pytest.raises(NotFoundError):
        seeded.get_feedback("fb-unknown", api_key_id="key-a")
    with pytest.raises(NotFoundError):
        seeded.get_feedback(fb.feedback_id, api_key_id="key-b")
    with pytest.raises(NotFoundError):
        seeded.get_feedback(fb.feedback_id)


def test_pending_feedback_order_watermark_and_mark_trained(store):
    store.record_completions(make_records("chatcmpl-a", 3))
    store.record_completions(make_records("chatcmpl-b", 1))
    for rid, idx in [("chatcmpl-b", 0), ("chatcmpl-a", 2), ("chatcmpl-a", 0)]:
        store.add_feedback(response_id=rid, choice_index=idx, rating=1, api_key_id="key-a")
    pending = store.pending_feedback()
    assert [f.seq for f, _ in pending] == [1, 2, 3]
    assert [(c.response_id, c.choice_index) for _, c in pending] == [
        ("chatcmpl-b", 0), ("chatcmpl-a", 2), ("chatcmpl-a", 0)]
    assert pending[1][1].response_token_ids == [12, 20, 30]
    assert [f.seq for f, _ in store.pending_feedback(after_seq=1, limit=1)] == [2]
    store.mark_trained([1, 3])
    assert [f.seq for f, _ in store.pending_feedback()] == [2]
    assert store.count_feedback("trained") == 2 and store.count_feedback("pending") == 1
    assert store.count_feedback() == 3
    assert store.count_feedback("pending", after_seq=2) == 0 and store.count_feedback("pending", after_seq=1) == 1
    assert store.count_feedback(after_seq=1) == 2


def test_concurrent_add_feedback_distinct_seqs(store):
    store.record_completions(make_records("chatcmpl-c", 8))
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker(index: int) -> None:
        barrier.wait()
        try:
            results.append(store.add_feedback(response_id="chatcmpl-c", choice_index=index,
                                              stars=1 + index % 5, api_key_id="key-a"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(created for _, created in results)
    assert sorted(fb.seq for fb, _ in results) == list(range(1, 9))
    assert store.count_feedback("pending") == 8


def test_durable_across_reopen(tmp_path):
    path = tmp_path / "fb.db"
    first = FeedbackStore(path)
    first.record_completions(make_records())
    fb, _ = first.add_feedback(response_id="chatcmpl-1", choice_index=1, rating=-1,
                               api_key_id="key-a")
    first.close()
    second = FeedbackStore(path)
    assert second.get_feedback(fb.feedback_id, "key-a") == fb
    assert second.num_choices("chatcmpl-1") == 2
    fb2, _ = second.add_feedback(response_id="chatcmpl-1", choice_index=0, rating=1,
                                 api_key_id="key-a")
    assert fb2.seq == fb.seq + 1
    second.close()


CHILD_SCRIPT = """
import os, signal, sys, time
from store.feedback_store import CompletionRecord, FeedbackStore
s = FeedbackStore(sys.argv[1])
s.record_completions([CompletionRecord("cmpl-k", 0, [1], [2], [-0.5], 3, "k", time.time())])
fb, _ = s.add_feedback(response_id="cmpl-k", choice_index=0, stars=4, api_key_id="k")
print("ok", fb.feedback_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_survives_sigkill(tmp_path):
    path = tmp_path / "killed.db"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, str(path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    status, feedback_id = proc.stdout.split()
    assert status == "ok"
    store = FeedbackStore(path)
    fb = store.get_feedback(feedback_id, api_key_id="k")
    assert fb.stars == 4 and fb.status == "pending"
    assert store.get_completion("cmpl-k", 0).logprobs == [-0.5]
    store.close()


def test_purge_expired_keeps_pending(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db", retention_seconds=100)
    now = 10_000.0
    store.record_completions(make_records("old-pending", 2, created=now - 500))
    store.record_completions(make_records("old-trained", 1, created=now - 500))
    store.record_completions(make_records("old-none", 1, created=now - 500))
    store.record_completions(make_records("fresh", 1, created=now - 10))
    store.add_feedback(response_id="old-pending", choice_index=1, rating=1, api_key_id="key-a")
    trained, _ = store.add_feedback(response_id="old-trained", choice_index=0, rating=1,
                                    api_key_id="key-a")
    store.mark_trained([trained.seq])
    assert store.purge_expired(now=now) == 3  # 2 completions + 1 trained feedback
    assert store.num_choices("old-pending") == 2
    assert store.num_choices("old-trained") == 0 and store.num_choices("old-none") == 0
    assert store.num_choices("fresh") == 1
    assert store.count_feedback() == 1 and len(store.pending_feedback()) == 1
    assert store.purge_expired(now=now) == 0
    store.close()


def test_purge_disabled_without_retention(seeded):
    assert seeded.purge_expired(now=time.time() + 10**9) == 0


def test_seq_not_reused_after_purge(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db", retention_seconds=1)
    store.record_completions(make_records("r1", 1, created=0.0))
    fb, _ = store.add_feedback(response_id="r1", choice_index=0, rating=1, api_key_id="key-a")
    store.mark_trained([fb.seq])
    store.purge_expired(now=100.0)
    store.record_completions(make_records("r2", 1))
    fb2, _ = store.add_feedback(response_id="r2", choice_index=0, rating=1, api_key_id="key-a")
    assert fb2.seq > fb.seq
    store.close()


def _feedback(rating=None, stars=None) -> Feedback:
    return Feedback("fb-x", 1, "r", 0, rating, stars, None, None, None, 0.0, 0.0, "pending")


@pytest.mark.parametrize("rating, stars, reward", [
    (1, None, 1.0), (-1, None, -1.0),
    (None, 5, 1.0), (None, 4, 1.0), (None, 3, 0.0), (None, 2, -1.0), (None, 1, -1.0),
])
def test_reward_mapping(rating, stars, reward):
    assert _feedback(rating, stars).reward() == reward


def test_closed_store_raises(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError):
        store.count_feedback()


def test_schema_version_mismatch_is_config_error(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value=99 WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError):
        FeedbackStore(path)


def test_per_token_adapter_versions_round_trip(store):
    """A response produced partly by version 7 and, from its 3rd token, by version 9 (a version went live
    while it was generated) keeps both spans; a record without spans is its adapter_version's alone."""
    spanned = dataclasses.replace(make_records("chatcmpl-span", 1)[0], adapter_versions=((0, 7), (2, 9)))
    store.record_completions([spanned, *make_records("chatcmpl-plain", 1)])
    got = store.get_completion("chatcmpl-span", 0)
    assert got.adapter_versions == ((0, 7), (2, 9)) and got.versions_per_token() == [7, 7, 9]
    plain = store.get_completion("chatcmpl-plain", 0)
    assert plain.adapter_versions == ((0, 7),) and plain.versions_per_token() == [7, 7, 7]
