"""When the online trainer may look for feedback and train (issue 5: training yields to serving)."""
from __future__ import annotations

import time

from trainer.config import TrainerConfig

DUTY_WINDOW_S = 30.0
FEEDBACK_POLL_S = 1.0       # after an empty look, the store is asked again this late unless feedback arrives


class StepPacing:
    """A duty cycle (the share of wall time steps may take while the engine serves, over a sliding
    window), a poll interval for the feedback store, and the wait for a full batch of ratings."""

    def __init__(self, config: TrainerConfig, threaded: bool):
        self.config = config
        self.duty_cycle = config.duty_for(threaded)
        self.busy_s, self.window_start = 0.0, time.monotonic()
        self.next_poll = 0.0                # no SQLite query on every look while nothing is pending
        self.waiting_since: float | None = None   # when the pending ratings started to wait for a full step

    def may_look(self, now: float, serving: bool) -> bool:
        if now - self.window_start > DUTY_WINDOW_S:           # halve the history: recent time counts most
            self.busy_s, self.window_start = self.busy_s / 2, now - DUTY_WINDOW_S / 2
        if serving and self.busy_s > self.duty_cycle * (now - self.window_start):
            return False
        return now >= self.next_poll

    def batch_ready(self, num_pending: int, now: float) -> bool:
        """A step waits for min_records_per_step ratings, or until the first waiting one is max_wait_s
        old (steps of one rating each would publish a version per rating and learn noisily)."""
        if num_pending and self.waiting_since is None:
            self.waiting_since = now
        if num_pending == 0 or (num_pending < self.config.min_records_per_step
                                and now - self.waiting_since < self.config.max_wait_s):
            self.next_poll = now + FEEDBACK_POLL_S
            if num_pending == 0:
                self.waiting_since = None
            return False
        self.waiting_since = None
        return True

    def poll_now(self) -> None:
        """Feedback arrived (or training resumed): look at the next chance."""
        self.next_poll = 0.0

    def spent(self, seconds: float) -> None:
        self.busy_s += seconds
