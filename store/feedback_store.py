"""Durable log of served completions and the user feedback on them.

One SQLite database in WAL mode with synchronous=FULL: every public write
commits before it returns, so a returned call survives kill -9 and power loss.
One connection, guarded by a lock, is shared by all threads.

`Feedback.seq` is the training watermark: a strictly increasing integer drawn
from a counter in the `meta` table (never reused, even after purges). Replacing
a feedback gives it a new seq and sets it back to "pending".
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError
from store.feedback_quarantine import QuarantineOps
from store.feedback_records import (CompletionRecord, Feedback, is_int, pack, row_to_completion,
                                    validate_score, validate_text)
from store.feedback_schema import (COMPLETION_COLS as _COMPLETION_COLS, FEEDBACK_COLS as _FEEDBACK_COLS,
                                   NUM_FEEDBACK_COLS, SCHEMA, SCHEMA_VERSION, settle_version)

__all__ = ["CompletionRecord", "Feedback", "FeedbackStore", "SCHEMA_VERSION"]

class FeedbackStore(QuarantineOps):
    """Thread-safe SQLite store of completions and feedback (and the quarantine: QuarantineOps)."""

    def __init__(self, path: str | os.PathLike, retention_seconds: float | None = None):
        self.path = Path(path)
        self.retention_seconds = retention_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            self._conn.close()
            raise ConfigError(f"Cannot enable WAL mode on {self.path} (got {mode!r}); "
                              f"put the feedback database on a local filesystem.")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=10000")
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    def _init_schema(self) -> None:
        with self._lock:
            self._live_conn().executescript(SCHEMA)  # idempotent; commits itself
        with self._transaction() as cur:
            settle_version(cur, self.path)           # an older database is migrated in place

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """Hold the lock and run one write transaction, committed before the lock is released."""
        with self._lock:
            cur = self._live_conn().cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._live_conn().execute(sql, params).fetchall()

    def _live_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"FeedbackStore({self.path}) is closed")
        return self._conn

    def record_completions(self, records: list[CompletionRecord]) -> None:
        """Insert all records in one transaction. Duplicate (id, choice) -> ConflictError."""
        rows = []
        for rec in records:
            if len(rec.logprobs) != len(rec.response_token_ids):
                raise ValueError(f"{rec.response_id}[{rec.choice_index}]: {len(rec.logprobs)} "
                                 f"logprobs for {len(rec.response_token_ids)} response tokens")
            rows.append((rec.response_id, rec.choice_index, pack(rec.prompt_token_ids, "i"),
                         pack(rec.response_token_ids, "i"), pack(rec.logprobs, "d"),
                         rec.adapter_version, rec.api_key_id, rec.created,
                         rec.finish_reason, rec.model,
                         pack([x for span in rec.adapter_versions for x in span], "q")))
        try:
            with self._transaction() as cur:
                cur.executemany(f"INSERT INTO completions ({_COMPLETION_COLS}) "
                                f"VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"Completion already recorded: {exc}") from exc

    def get_completion(self, response_id: str, choice_index: int) -> CompletionRecord | None:
        rows = self._query(f"SELECT {_COMPLETION_COLS} FROM completions "
                           f"WHERE response_id=? AND choice_index=?", (response_id, choice_index))
        return row_to_completion(rows[0]) if rows else None

    def num_choices(self, response_id: str) -> int:
        return self._query("SELECT COUNT(*) FROM completions WHERE response_id=?",
                           (response_id,))[0][0]

    def add_feedback(self, *, response_id: str, choice_index: int, rating: int | None = None,
                     stars: int | None = None, comment: str | None = None,
                     better_response: str | None = None, replace: bool = False,
                     api_key_id: str | None = None, reward: float | None = None) -> tuple[Feedback, bool]:
        """Record (or with replace=True, overwrite) feedback; returns (row, created_new). Exactly one of
        rating, stars, reward. A replaced rating is pending again (out of the quarantine, if it was in)."""
        validate_score(rating, stars, reward)
        reward = None if reward is None else float(reward)
        validate_text(comment, "comment")
        validate_text(better_response, "better_response")
        with self._transaction() as cur:
            self._check_choice(cur, response_id, choice_index, api_key_id)
            existing = cur.execute("SELECT feedback_id FROM feedback WHERE response_id=? "
                                   "AND choice_index=?", (response_id, choice_index)).fetchone()
            if existing is not None and not replace:
                raise ConflictError(
                    f"Feedback for '{response_id}' choice {choice_index} already exists; "
                    f'pass "replace": true to overwrite it.', param="replace")
            seq, now = self._next_seq(cur), time.time()
            if existing is None:
                feedback_id = "fb-" + uuid.uuid4().hex
                cur.execute(f"INSERT INTO feedback ({_FEEDBACK_COLS}) VALUES "
                            f"(?,?,?,?,?,?,?,?,?,?,?,'pending',?,NULL,NULL,NULL)",
                            (feedback_id, seq, response_id, choice_index, rating, stars,
                             comment, better_response, api_key_id, now, now, reward))
            else:
                feedback_id = existing[0]
                cur.execute("UPDATE feedback SET seq=?, rating=?, stars=?, reward=?, comment=?, "
                            "better_response=?, updated=?, status='pending', quarantine_reason=NULL, "
                            "quarantine_error=NULL, quarantined_at=NULL WHERE feedback_id=?",
                            (seq, rating, stars, reward, comment, better_response, now, feedback_id))
            row = cur.execute(f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE feedback_id=?",
                              (feedback_id,)).fetchone()
        return Feedback(*row), existing is None

    @staticmethod
    def _check_choice(cur: sqlite3.Cursor, response_id: str, choice_index: object,
                      api_key_id: str | None) -> None:
        rows = cur.execute("SELECT choice_index, api_key_id FROM completions WHERE response_id=?",
                           (response_id,)).fetchall()
        if not rows or any(owner != api_key_id for _, owner in rows):
            raise NotFoundError(f"No completion with id '{response_id}'.", param="id")
        indices = {index for index, _ in rows}
        if not is_int(choice_index) or choice_index not in indices:
            raise InvalidRequestError(
                f"'choice_index' must be an integer from 0 to {len(rows) - 1} "
                f"for completion '{response_id}'.", param="choice_index")

    @staticmethod
    def _next_seq(cur: sqlite3.Cursor) -> int:
        seq = cur.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0] + 1
        cur.execute("UPDATE meta SET value=? WHERE key='last_seq'", (seq,))
        return seq

    def get_feedback(self, feedback_id: str, api_key_id: str | None = None) -> Feedback:
        rows = self._query(f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE feedback_id=?",
                           (feedback_id,))
        if not rows or rows[0][8] != api_key_id:
            raise NotFoundError(f"No feedback with id '{feedback_id}'.", param="feedback_id")
        return Feedback(*rows[0])

    def pending_feedback(self, after_seq: int = 0,
                         limit: int = 100) -> list[tuple[Feedback, CompletionRecord]]:
        """Pending feedback with seq > after_seq, oldest first, joined with its completion."""
        if limit <= 0:
            return []
        fb_cols = ", ".join("f." + c.strip() for c in _FEEDBACK_COLS.split(","))
        c_cols = ", ".join("c." + c.strip() for c in _COMPLETION_COLS.split(","))
        rows = self._query(
            f"SELECT {fb_cols}, {c_cols} FROM feedback f JOIN completions c "
            f"ON c.response_id=f.response_id AND c.choice_index=f.choice_index "
            f"WHERE f.status='pending' AND f.seq>? ORDER BY f.seq LIMIT ?", (after_seq, limit))
        return [(Feedback(*r[:NUM_FEEDBACK_COLS]), row_to_completion(r[NUM_FEEDBACK_COLS:])) for r in rows]

    def mark_trained(self, seqs: list[int]) -> None:
        """Mark pending rows trained. A seq replaced since it was read matches nothing, so the
        replacement stays pending."""
        with self._transaction() as cur:
            cur.executemany("UPDATE feedback SET status='trained' WHERE seq=? AND status='pending'",
                            [(int(s),) for s in seqs])

    def count_feedback(self, status: str | None = None, after_seq: int = 0) -> int:
        """Feedback rows (of `status`, if given) with seq > after_seq."""
        if status is None:
            return self._query("SELECT COUNT(*) FROM feedback WHERE seq>?", (after_seq,))[0][0]
        return self._query("SELECT COUNT(*) FROM feedback WHERE status=? AND seq>?", (status, after_seq))[0][0]

    def pending_backlog(self, after_seq: int = 0) -> tuple[int, int, float | None]:
        """(ratings, tokens, oldest) of the pending feedback with seq > after_seq, in one query (the
        (status, seq) index, then each rating's completion by primary key; token blobs are measured,
        never read). tokens: the prompt + response tokens of each rating's completion (int32 blobs:
        bytes / 4), plus for a rating with a `better_response` its prompt again and the answer's UTF-8
        bytes / 4 (stored as text: an estimate, ~4 bytes a token, rather than tokenizing on every
        scrape). oldest: the `updated` time (time.time()) of the oldest such rating -- when it became
        pending: its creation, or its rater's replacement; None when there is none."""
        row = self._query(
            "SELECT COUNT(*), COALESCE(SUM((LENGTH(c.prompt_token_ids) + LENGTH(c.response_token_ids)) / 4"
            " + CASE WHEN f.better_response IS NULL THEN 0 ELSE LENGTH(c.prompt_token_ids) / 4"
            " + (LENGTH(CAST(f.better_response AS BLOB)) + 3) / 4 END), 0), MIN(f.updated) "
            "FROM feedback f JOIN completions c "
            "ON c.response_id=f.response_id AND c.choice_index=f.choice_index "
            "WHERE f.status='pending' AND f.seq>?", (int(after_seq),))[0]
        return int(row[0]), int(row[1]), row[2]

    def purge_expired(self, now: float | None = None) -> int:
        """Delete responses whose newest choice is older than the retention, with their
        non-pending feedback. A response with any pending feedback is kept whole (so
        choice counts stay right). Returns completion + feedback rows deleted."""
        if self.retention_seconds is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        expired = ("SELECT response_id FROM completions GROUP BY response_id "
                   "HAVING MAX(created) < ? AND response_id NOT IN "
                   "(SELECT response_id FROM feedback WHERE status='pending')")
        with self._transaction() as cur:
            cur.execute(f"DELETE FROM feedback WHERE response_id IN ({expired})", (cutoff,))
            deleted = cur.rowcount
            cur.execute(f"DELETE FROM completions WHERE response_id IN ({expired})", (cutoff,))
            deleted += cur.rowcount
        return deleted

    def close(self) -> None:
        """Close the connection (idempotent); SQLite checkpoints the WAL on last close."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
