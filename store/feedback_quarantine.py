"""The quarantine of the feedback log: ratings the trainer could not train (DESIGN §4; issue 15).

A quarantined rating keeps its row (status 'quarantined', with the reason, the error and the time), is
skipped by `pending_feedback`, and stays so across restarts until an admin retries it (back to
'pending' with a new seq, so the trainer's in-memory watermark finds it again, as a replace does) or
drops it (status 'dropped': the row stays, so the rater still reads it and a duplicate still conflicts;
retention purges it like any trained rating). Every write commits before it returns."""
from __future__ import annotations

import time

from common.errors import NotFoundError
from store.feedback_records import Feedback
from store.feedback_schema import FEEDBACK_COLS

MAX_ERROR_CHARS = 1000       # an exception's message is kept up to this length


class QuarantineOps:
    """Mixed into FeedbackStore (which provides `_transaction`, `_query` and `_next_seq`)."""

    def quarantine(self, seq: int, reason: str, error: str) -> bool:
        """Quarantine the pending rating `seq` (durable on return). False if that seq is no longer
        pending (replaced by its rater since the trainer read it: the replacement stays pending)."""
        with self._transaction() as cur:
            cur.execute("UPDATE feedback SET status='quarantined', quarantine_reason=?, quarantine_error=?, "
                        "quarantined_at=? WHERE seq=? AND status='pending'",
                        (reason, error[:MAX_ERROR_CHARS], time.time(), int(seq)))
            return cur.rowcount == 1

    def quarantined(self, limit: int = 100) -> list[Feedback]:
        """Quarantined ratings, the most recently quarantined first."""
        rows = self._query(f"SELECT {FEEDBACK_COLS} FROM feedback WHERE status='quarantined' "
                           f"ORDER BY quarantined_at DESC, seq DESC LIMIT ?", (max(0, int(limit)),))
        return [Feedback(*row) for row in rows]

    def retry_quarantined(self, feedback_id: str) -> Feedback:
        """Back to 'pending' with a new seq (the trainer reads it again); NotFoundError if `feedback_id`
        is not in the quarantine."""
        with self._transaction() as cur:
            self._require_quarantined(cur, feedback_id)
            cur.execute("UPDATE feedback SET status='pending', seq=?, quarantine_reason=NULL, "
                        "quarantine_error=NULL, quarantined_at=NULL WHERE feedback_id=?",
                        (self._next_seq(cur), feedback_id))
            return Feedback(*cur.execute(f"SELECT {FEEDBACK_COLS} FROM feedback WHERE feedback_id=?",
                                         (feedback_id,)).fetchone())

    def drop_quarantined(self, feedback_id: str) -> Feedback:
        """Status 'dropped' (kept, never trained); NotFoundError if not in the quarantine."""
        with self._transaction() as cur:
            self._require_quarantined(cur, feedback_id)
            cur.execute("UPDATE feedback SET status='dropped' WHERE feedback_id=?", (feedback_id,))
            return Feedback(*cur.execute(f"SELECT {FEEDBACK_COLS} FROM feedback WHERE feedback_id=?",
                                         (feedback_id,)).fetchone())

    @staticmethod
    def _require_quarantined(cur, feedback_id: str) -> None:
        row = cur.execute("SELECT status FROM feedback WHERE feedback_id=?", (feedback_id,)).fetchone()
        if row is None or row[0] != "quarantined":
            raise NotFoundError(f"No quarantined feedback with id '{feedback_id}'.", param="feedback_id")
