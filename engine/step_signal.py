"""What the engine's step in flight computes, for work on other threads that yields to serving (the
trainer thread waits at layer boundaries while a step computes many prompt tokens)."""
from __future__ import annotations

import threading


class StepSignal:
    def __init__(self):
        self._cond = threading.Condition()
        self.prefill_tokens = 0                # prompt tokens of the step in flight (0 between steps)
        self.last_prefill_tokens = 0           # ... of the latest step, kept after it ended (diagnostics)

    def begin(self, prefill_tokens: int) -> None:
        self.last_prefill_tokens = prefill_tokens
        if prefill_tokens:
            with self._cond:
                self.prefill_tokens = prefill_tokens

    def end(self) -> None:
        if self.prefill_tokens:
            with self._cond:
                self.prefill_tokens = 0
                self._cond.notify_all()

    def wait_below(self, prefill_tokens: int, timeout: float | None = None) -> bool:
        """Block while the step in flight computes >= `prefill_tokens` prompt tokens; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.prefill_tokens < prefill_tokens, timeout)
