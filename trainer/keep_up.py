"""Whether online training keeps up with the ratings (issue 17, item 3): the backlog of ratings not yet
taken into a step (how many, their tokens, the age of the oldest) and the trained tokens per second
over a sliding window. The trainer reports each optimizer step (`trained`); /metrics, the dashboard and
/v1/training/status read `snapshot`, which costs one SQL query (FeedbackStore.pending_backlog)."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from common.errors import ConfigError


class KeepUp:
    """`store`: a FeedbackStore. `clock` (monotonic seconds) times the trained-token window; the
    oldest rating's age is measured on `wall_clock` (time.time), the clock its stored time is on."""

    def __init__(self, store, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        if not window_s > 0:
            raise ConfigError(f"KeepUp window_s must be positive seconds, got {window_s!r}.")
        self.store, self.window_s = store, float(window_s)
        self.clock, self.wall_clock = clock, wall_clock
        self.started = clock()
        self._steps: deque[tuple[float, int]] = deque()     # (clock time, tokens) of the steps in the window
        self._window_tokens = 0
        self._lock = threading.Lock()                         # the trainer writes, scrapes read

    def trained(self, tokens: int) -> None:
        """One optimizer step trained `tokens` tokens (prompt + response of its records)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"trained tokens must be a non-negative int, got {tokens!r}")
        now = self.clock()
        with self._lock:
            self._steps.append((now, tokens))
            self._window_tokens += tokens
            self._expire(now)

    def trained_tok_s(self) -> float:
        """Tokens trained in the last `window_s` seconds per second (over the time since start while
        that is shorter than the window)."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            tokens = self._window_tokens
        span = min(self.window_s, now - self.started)
        return tokens / span if span > 0 else 0.0

    def _expire(self, now: float) -> None:
        while self._steps and self._steps[0][0] <= now - self.window_s:
            self._window_tokens -= self._steps.popleft()[1]

    def snapshot(self, read_seq: int) -> dict:
        """The backlog past the trainer's watermark `read_seq` and the training rate. Raises
        RuntimeError when the store is closed (shutting down)."""
        count, tokens, oldest = self.store.pending_backlog(read_seq)
        age = max(0.0, self.wall_clock() - oldest) if oldest is not None else 0.0
        return {"backlog_ratings": count, "backlog_tokens": tokens, "oldest_pending_s": age,
                "trained_tok_s": self.trained_tok_s()}
