"""The feedback database's schema, its version, and the in-place migrations from older versions.

Version 2 (issue 15) added to `feedback`: `reward` (a programmatic grader's score in [-1, 1], the
third form beside `rating` and `stars`) and the quarantine columns (`quarantine_reason`,
`quarantine_error`, `quarantined_at`) of a rating the trainer could not train, and to `completions`
`adapter_versions` (int64 pairs: first response token, version — each version that produced part of the
answer; NULL in rows from v1: all from `adapter_version`). Feedback status is one of
FEEDBACK_STATUSES."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from common.errors import ConfigError

SCHEMA_VERSION = 2
# pending: waiting to be trained; trained: in a durable checkpoint; quarantined: the trainer could not
# train it (skipped until an admin retries it); dropped: an admin removed it from the quarantine
FEEDBACK_STATUSES = ("pending", "trained", "quarantined", "dropped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS completions (
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    prompt_token_ids BLOB NOT NULL, response_token_ids BLOB NOT NULL, logprobs BLOB NOT NULL,
    adapter_version INTEGER NOT NULL, api_key_id TEXT, created REAL NOT NULL,
    finish_reason TEXT, model TEXT, adapter_versions BLOB,
    PRIMARY KEY (response_id, choice_index));
CREATE INDEX IF NOT EXISTS completions_created ON completions (created);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,
    response_id TEXT NOT NULL, choice_index INTEGER NOT NULL,
    rating INTEGER, stars INTEGER, comment TEXT, better_response TEXT, api_key_id TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, status TEXT NOT NULL,
    reward REAL, quarantine_reason TEXT, quarantine_error TEXT, quarantined_at REAL,
    UNIQUE (response_id, choice_index),
    FOREIGN KEY (response_id, choice_index) REFERENCES completions (response_id, choice_index));
CREATE INDEX IF NOT EXISTS feedback_status_seq ON feedback (status, seq);
"""

COMPLETION_COLS = ("response_id, choice_index, prompt_token_ids, response_token_ids, logprobs, "
                   "adapter_version, api_key_id, created, finish_reason, model, adapter_versions")
FEEDBACK_COLS = ("feedback_id, seq, response_id, choice_index, rating, stars, comment, "
                 "better_response, api_key_id, created, updated, status, "
                 "reward, quarantine_reason, quarantine_error, quarantined_at")
NUM_FEEDBACK_COLS = len(FEEDBACK_COLS.split(","))

# version -> the statements that bring a database of that version to the next one
_MIGRATIONS = {
    1: ("ALTER TABLE feedback ADD COLUMN reward REAL",
        "ALTER TABLE feedback ADD COLUMN quarantine_reason TEXT",
        "ALTER TABLE feedback ADD COLUMN quarantine_error TEXT",
        "ALTER TABLE feedback ADD COLUMN quarantined_at REAL",
        "ALTER TABLE completions ADD COLUMN adapter_versions BLOB"),
}


def settle_version(cur: sqlite3.Cursor, path: Path) -> None:
    """Inside a write transaction after SCHEMA ran: stamp a new database, migrate an older one in place
    (all steps commit together or not at all), refuse one newer than this build."""
    row = cur.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        cur.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        cur.execute("INSERT INTO meta VALUES ('last_seq', 0)")
        return
    version = row[0]
    if version not in _MIGRATIONS and version != SCHEMA_VERSION:
        raise ConfigError(f"Feedback database {path} has schema version {version}, this build reads "
                          f"versions 1 to {SCHEMA_VERSION}; use a matching build or a new database path.")
    while version < SCHEMA_VERSION:
        for statement in _MIGRATIONS[version]:
            cur.execute(statement)
        version += 1
    cur.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
