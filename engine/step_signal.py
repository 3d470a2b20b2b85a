"""What the engine's step in flight computes, for work on other threads that yields to serving (the
trainer thread waits at layer boundaries while a step computes many prompt tokens)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

# an observer of finished steps: (start, end, prompt tokens, decoding sequences), times time.monotonic()
StepObserver = Callable[[float, float, int, int], None]


class StepSignal:
    def __init__(self):
        self._cond = threading.Condition()
        self.prefill_tokens = 0                # prompt tokens of the step in flight (0 between steps)
        self.last_prefill_tokens = 0           # ... of the latest step, kept after it ended (diagnostics)
        self._decode_seqs, self._start = 0, 0.0
        self._observers: tuple[StepObserver, ...] = ()

    def observe(self, observer: StepObserver) -> None:
        """Call `observer` at the end of every step, on the engine thread: it must be cheap (an append)."""
        self._observers += (observer,)

    def unobserve(self, observer: StepObserver) -> None:
        self._observers = tuple(o for o in self._observers if o != observer)   # bound methods: equal, not identical

    def begin(self, prefill_tokens: int, decode_seqs: int = 0) -> None:
        self.last_prefill_tokens, self._decode_seqs = prefill_tokens, decode_seqs
        self._start = time.monotonic()
        if prefill_tokens:
            with self._cond:
                self.prefill_tokens = prefill_tokens

    def end(self) -> None:
        if self.prefill_tokens:
            with self._cond:
                self.prefill_tokens = 0
                self._cond.notify_all()
        if self._observers:
            end = time.monotonic()
            for observer in self._observers:
                observer(self._start, end, self.last_prefill_tokens, self._decode_seqs)

    def wait_below(self, prefill_tokens: int, timeout: float | None = None) -> bool:
        """Block while the step in flight computes >= `prefill_tokens` prompt tokens; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.prefill_tokens < prefill_tokens, timeout)
