"""Host time of the phases of an engine step, for finding where a step's wall time goes beyond its
kernels: scheduling, the capture's `begin` (reservations, capture slots), `prepare` (host tensors),
launching the model forward (no sync: the time until the forward returns), the rest of `execute` (LM
head, sampling, and waiting for the step's one host sync), and the capture's `end`.

    with StepPhases(engine) as phases:
        ...engine.step()...
    phases.medians_ms()   # {"schedule": ..., "prepare": ..., "forward_launch": ..., ...}
"""
from __future__ import annotations

import statistics
import time


class StepPhases:
    def __init__(self, engine):
        self.engine = engine
        self.samples: dict[str, list[float]] = {}
        self._undo = []

    def __enter__(self) -> "StepPhases":
        runner, engine = self.engine.runner, self.engine
        self._wrap(engine.scheduler, "schedule")
        self._wrap(runner, "prepare")
        self._wrap(runner, "execute")
        if engine.capture is not None:
            self._wrap(engine.capture, "begin")
            self._wrap(engine.capture, "end")
        start = {}
        hooks = [runner.model.register_forward_pre_hook(lambda *_: start.update(t=time.perf_counter())),
                 runner.model.register_forward_hook(
                     lambda *_: self._add("forward_launch", time.perf_counter() - start["t"]))]
        self._undo.append(lambda: [h.remove() for h in hooks])
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def medians_ms(self) -> dict[str, float]:
        out = {k: statistics.median(v) * 1e3 for k, v in self.samples.items()}
        if {"execute", "prepare", "forward_launch"} <= out.keys():   # LM head, sampling, the host sync
            out["execute_rest"] = statistics.median(
                e - p - f for e, p, f in zip(self.samples["execute"], self.samples["prepare"],
                                             self.samples["forward_launch"])) * 1e3
        return out

    def _add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def _wrap(self, owner, name: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._add(name, time.perf_counter() - t)
        setattr(owner, name, timed)
        self._undo.append(lambda: delattr(owner, name))
