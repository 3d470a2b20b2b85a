"""Training beside serving (issue 5, DESIGN §1): `OnlineTrainer.work()` on a thread of its own, so a
training step never holds the engine thread. On CUDA the thread issues its kernels on a stream of the
lowest priority while the engine serves on one of the highest: the GPU's block scheduler gives serving's
kernels the SMs first and training fills what is left. A new adapter version still goes live only at
an engine step boundary (the trainer offers it through its port; the engine applies the newest offer).

Between layers (forward and backward) a step from this thread waits for its own kernels and then
while the engine's step in flight computes >= `training.yield_prefill_tokens` prompt tokens
(`yield_gate`): compute-bound prefill is what sharing the SMs slows most, and at most one layer of
training work is queued when such a step starts.

The thread holds the runner's `graph_capture_lock` for each unit of work, so decode CUDA graphs are never
captured while it issues CUDA calls. While it runs, the interpreter's thread switch interval is at most
`training.switch_interval_ms`: a thread waiting for the GIL (the engine's, between kernel launches) gets it
within that time instead of CPython's default 5 ms.
"""
from __future__ import annotations

import logging
import sys
import threading

import torch

log = logging.getLogger("alchemist.trainer")
IDLE_WAIT_S = 0.05          # after a look that trained nothing, look again this late unless woken
LOWEST_PRIORITY = 0         # CUDA stream priorities: lower numbers run first; 0 is the lowest


class TrainerThread:
    def __init__(self, trainer):
        self.trainer = trainer                 # an OnlineTrainer: step() trains at most one step
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._green = None                     # the green context limiting the trainer's SMs, if any
        self.sms: int | None = None            # SMs the trainer's kernels may use (CUDA, once running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        sys.setswitchinterval(min(sys.getswitchinterval(), self.trainer.config.switch_interval_ms / 1e3))
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="alchemist-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> bool:
        """Stop after the current step; False if it is still running after `timeout` s."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("trainer thread still in a step after %.0f s", timeout)
                return False
        return True

    def _stream(self, device: torch.device, sm_share: float | None) -> torch.cuda.Stream:
        """A stream limited to `sm_share` of the SMs (green context) if asked and supported; else one of
        the lowest priority over all SMs. `self.sms`: the SMs the trainer's kernels may use."""
        total = torch.cuda.get_device_properties(device).multi_processor_count
        self.sms = total
        if sm_share is not None:
            sms = max(8, int(total * sm_share) // 8 * 8)      # green contexts split SMs in groups of 8
            try:
                from torch.cuda.green_contexts import GreenContext
                self._green = GreenContext.create(num_sms=sms, device_id=device.index or 0)
                stream = self._green.Stream()
                self.sms = sms
                log.info("trainer thread: %d of %d SMs (green context)", sms, total)
                return stream
            except (ImportError, RuntimeError, AttributeError, TypeError) as err:
                log.warning("trainer thread: no green context (%s); all %d SMs at low priority", err, total)
        return torch.cuda.Stream(device, priority=LOWEST_PRIORITY)

    def wake(self) -> None:
        """Look for feedback now (a rating arrived, training resumed)."""
        self._wake.set()

    def _loop(self) -> None:
        port = self.trainer.port
        try:
            if port.serving_stream is not None:
                torch.cuda.set_stream(self._stream(port.device, self.trainer.config.sm_share))
        except Exception as err:               # no stream for training: say so where status shows it
            log.exception("trainer thread could not start")
            self.trainer.last_error = f"trainer thread: {type(err).__name__}: {err}"
            self.trainer.pause()
            return
        while not self._stop.is_set():
            with port.graph_capture_lock:
                trained = self.trainer.step()    # failures pause training (last_error)
            if not trained:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()


def yield_gate(port, prefill_tokens: int | None):
    """The `between_layers` callback of a step on the trainer thread (None: never wait); `port`: the
    trainer's engine.training_port.TrainingPort."""
    if prefill_tokens is None:
        return None
    stream = torch.cuda.current_stream(port.device) if port.device.type == "cuda" else None

    def gate() -> None:
        if stream is not None:
            stream.synchronize()             # this thread's previous layer is done: little queued behind
        port.step_signal.wait_below(prefill_tokens)
    return gate
