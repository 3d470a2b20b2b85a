"""The latency-budget controller of the trainer thread (issue 17): training may take whatever GPU time
serving leaves, as long as serving's steps stay within `slo_ratio` of their length without training.

The engine reports every serving step (start, end, prompt tokens, decoding sequences) through its
`StepSignal` (a step's sample runs from the previous step's end: the host work between steps counts); the trainer reports when its units of work (a layer forward or backward, the step's tail)
start and end. A serving step that overlapped no unit is a *baseline* sample of its class (classes:
powers of two of prompt tokens and of decoding sequences: a decode step of 8 is not compared with a
prefill of 4,096 tokens); one that overlapped a unit is a *loaded* sample, compared with its class's
baseline. Over the recent loaded samples the ratio is sum(loaded) / sum(baseline of their classes) —
long steps weigh most, as they set the latency tail.

From that ratio the controller sets `share`, the fraction of wall time training units may take while
serving has work (additive increase under the SLO, multiplicative decrease over it), and after each
unit asks the trainer to wait `unit * (1 - share) / share`. Baselines are kept fresh: every
`probe_every_s` the trainer pauses for `probe_s`, so serving runs alone for a moment. With no serving
work in flight, no wait at all: training runs at full speed.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MIN_SHARE = 0.02              # training never stops outright: a tiny share keeps measuring the ratio
INCREASE, DECREASE = 0.05, 0.7
BASELINE_MOMENTUM = 0.9       # EWMA of a class's baseline step time
LOADED_WINDOW = 64            # loaded samples the ratio is taken over
MIN_LOADED = 4                # loaded samples with a baseline needed before the share moves
IDLE_GAP_S = 0.02             # a longer gap before a serving step: the engine was idle, not delayed


@dataclass(frozen=True)
class ServingStep:
    start: float
    end: float
    prefill_tokens: int
    decode_seqs: int

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def kind(self) -> tuple[int, int]:
        bucket = lambda n: 0 if n <= 0 else math.ceil(math.log2(n)) + 1
        return bucket(self.prefill_tokens), bucket(self.decode_seqs)


class LatencyBudget:
    def __init__(self, slo_ratio: float, clock: Callable[[], float] = time.monotonic,
                 initial_share: float = 0.25, probe_every_s: float = 5.0, probe_s: float = 0.1):
        self.slo_ratio, self.clock = slo_ratio, clock
        self.share = initial_share
        self.probe_every_s, self.probe_s = probe_every_s, probe_s
        self.steps: deque[ServingStep] = deque(maxlen=4096)   # appended by the engine thread, read here
        self._last_end: float | None = None
        self.baseline: dict[tuple[int, int], float] = {}
        self.loaded: deque[tuple[float, float]] = deque(maxlen=LOADED_WINDOW)   # (step s, its baseline s)
        self.fresh = 0                                    # loaded samples since the share last moved
        self.units: deque[tuple[float, float]] = deque(maxlen=256)               # recent (start, end)
        self.unit_start: float | None = None
        self.last_probe = clock()
        self.waited_s = 0.0                                # the waits it asked for, in total

    # -- reports ---------------------------------------------------------------------
    def serving_step(self, start: float, end: float, prefill_tokens: int, decode_seqs: int) -> None:
        """A serving step ended (the engine thread: an append, nothing else). What a decoding request
        sees is the time from the previous step's end to this one's, host work between steps included
        (where a trainer thread holding the GIL delays the engine): that is the sample, unless the
        engine was idle before the step (then the step alone)."""
        previous, self._last_end = self._last_end, end
        if previous is not None and start - previous < IDLE_GAP_S:
            start = previous
        self.steps.append(ServingStep(start, end, prefill_tokens, decode_seqs))

    def unit_begins(self) -> None:
        self.unit_start = self.clock()

    def unit_cancelled(self) -> None:
        """The unit did no GPU work worth counting (a look that found nothing to train)."""
        self.unit_start = None

    def unit_ends(self) -> float:
        """The unit's work is done (on CUDA: its stream synchronized); its length in seconds."""
        now = self.clock()
        start, self.unit_start = self.unit_start, None
        if start is None:
            return 0.0
        self.units.append((start, now))
        return now - start

    # -- control -----------------------------------------------------------------------
    def ratio(self) -> float | None:
        """Serving's loaded step time over its baseline, recent samples; None before there are enough."""
        if len(self.loaded) < MIN_LOADED:
            return None
        loaded = sum(s for s, _ in self.loaded)
        return loaded / max(sum(b for _, b in self.loaded), 1e-9)

    def wait_after(self, unit_s: float, serving: bool) -> float:
        """Seconds to wait after a unit of `unit_s` before the next one (0 while serving is idle)."""
        self._absorb()
        if not serving:
            return 0.0
        self._adjust()
        wait = unit_s * (1 - self.share) / self.share
        now = self.clock()
        if now - self.last_probe >= self.probe_every_s:
            self.last_probe = now
            wait = max(self.probe_s, wait)
        self.waited_s += wait
        return wait

    def _adjust(self) -> None:
        """Move the share on new evidence only: loaded samples taken since it last moved."""
        ratio = self.ratio()
        if ratio is None or self.fresh == 0:
            return
        self.fresh = 0
        if ratio > self.slo_ratio:
            self.share = max(MIN_SHARE, self.share * DECREASE)
            self.loaded.clear()                # judge the new share on its own samples
        else:
            self.share = min(1.0, self.share + INCREASE)

    def _absorb(self) -> None:
        """Sort the serving steps reported since the last look into baseline and loaded samples."""
        while self.steps:
            step = self.steps.popleft()
            if self._overlaps_training(step):
                base = self.baseline.get(step.kind)
                if base is not None:
                    self.loaded.append((step.seconds, base))
                    self.fresh += 1
            else:
                old = self.baseline.get(step.kind)
                self.baseline[step.kind] = step.seconds if old is None else (
                    BASELINE_MOMENTUM * old + (1 - BASELINE_MOMENTUM) * step.seconds)

    def _overlaps_training(self, step: ServingStep) -> bool:
        if self.unit_start is not None and self.unit_start < step.end:
            return True
        for start, end in reversed(self.units):     # newest first; ends only grow
            if end <= step.start:
                return False
            if start < step.end:
                return True
        return False

    def status(self) -> dict:
        ratio = self.ratio()
        return {"slo_ratio": self.slo_ratio, "share": round(self.share, 4),
                "serving_ratio": None if ratio is None else round(ratio, 4),
                "baseline_classes": len(self.baseline), "waited_s": round(self.waited_s, 3)}
