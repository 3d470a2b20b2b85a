"""Training beside serving (issue 5, DESIGN §1): `OnlineTrainer.work()` on a thread of its own, so a
training step never holds the engine thread. On CUDA the thread issues its kernels on a stream of the
lowest priority while the engine serves on one of the highest: the GPU's block scheduler gives serving's
kernels the SMs first and training fills what is left. A new adapter version still goes live only at
an engine step boundary (the trainer offers it through its port; the engine applies the newest offer).

Between layers (forward and backward) and after each step, a step from this thread waits for its own
kernels (at most one layer of training work is queued when a serving step starts) and then as long as
the latency budget says (`TrainingGate`, trainer/latency_budget.py: serving's step times stay within
`training.tbt_slo_ratio` of their length without training), and optionally while the engine's step in
flight computes >= `training.yield_prefill_tokens` prompt tokens.

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

from trainer.latency_budget import LatencyBudget

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
        config, port = trainer.config, trainer.port
        self.budget = LatencyBudget(config.tbt_slo_ratio) if config.tbt_slo_ratio is not None else None
        self.gate = TrainingGate(port, self.budget, config.yield_prefill_tokens, self._stop)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        sys.setswitchinterval(min(sys.getswitchinterval(), self.trainer.config.switch_interval_ms / 1e3))
        self._stop.clear()
        if self.budget is not None:          # the engine reports each serving step's time to the budget
            self.trainer.port.step_signal.observe(self.budget.serving_step)
        self._thread = threading.Thread(target=self._loop, name="alchemist-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> bool:
        """Stop after the current step; False if it is still running after `timeout` s."""
        self._stop.set()
        self._wake.set()
        if self.budget is not None:
            self.trainer.port.step_signal.unobserve(self.budget.serving_step)
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
        gate = self.gate
        while not self._stop.is_set():
            gate.begin()
            with port.graph_capture_lock:
                gate.holds_capture_lock = True
                try:
                    trained = self.trainer.step()    # failures pause training (last_error)
                finally:
                    gate.holds_capture_lock = False
            if trained:
                gate()                           # the step's tail was a unit too
            else:
                gate.cancel()
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()


class TrainingGate:
    """The trainer thread's pacing between units of work (each layer's forward or backward; a step's
    tail): the `between_layers` callback of a step, and the loop's bracket around each step.

    At each boundary the unit's kernels are waited for (CUDA: its stream synchronized, so at most one
    unit of training is queued beside serving and the unit's length is its GPU time), the latency budget
    (trainer/latency_budget.py) says how long to wait before the next unit, and, with
    `yield_prefill_tokens`, the gate also waits while the engine's step in flight computes that many
    prompt tokens. `budget` None: no pacing here (the duty cycle of trainer/pacing.py paces steps)."""

    def __init__(self, port, budget: LatencyBudget | None, prefill_tokens: int | None,
                 stop: threading.Event | None = None):
        self.port, self.budget, self.prefill_tokens = port, budget, prefill_tokens
        self.stop = stop or threading.Event()             # set: stop waiting (the thread is stopping)
        self.holds_capture_lock = False                   # the loop holds port.graph_capture_lock

    @property
    def active(self) -> bool:
        return self.budget is not None or self.prefill_tokens is not None

    def begin(self) -> None:
        if self.budget is not None:
            self.budget.unit_begins()

    def cancel(self) -> None:
        if self.budget is not None:
            self.budget.unit_cancelled()

    def __call__(self) -> None:
        """A unit ended: wait as the budget and the prefill yield say, then the next unit begins. While
        nothing is served, no sync and no wait: the host runs ahead of the GPU as in a bare step."""
        serving = self.port.has_unfinished()
        if serving and self.port.device.type == "cuda":   # this unit is done: none of it queued behind
            torch.cuda.current_stream(self.port.device).synchronize()
        if self.budget is not None:
            unit_s = self.budget.unit_ends()
            wait = self.budget.wait_after(unit_s, serving=serving)      # 0 while nothing is served
            if wait > 0:
                self._paused(lambda: self.stop.wait(wait))
        if self.prefill_tokens is not None:
            self._paused(lambda: self.port.step_signal.wait_below(self.prefill_tokens))
        self.begin()

    def _paused(self, wait) -> None:
        """Wait with the graph-capture lock let go: the engine may capture graphs meanwhile, since this
        thread issues no CUDA work while it waits."""
        if not self.holds_capture_lock:
            wait()
            return
        self.port.graph_capture_lock.release()
        try:
            wait()
        finally:
            self.port.graph_capture_lock.acquire()
