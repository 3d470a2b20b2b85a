"""Issue 17: the trainer thread's latency budget, with a fake clock. Training takes what serving leaves
while serving's steps stay within the SLO of their training-off length; it backs off when serving
slows; it runs at full speed while nothing is served."""
from __future__ import annotations

import pytest

from trainer.latency_budget import MIN_SHARE, LatencyBudget

DECODE_S, PREFILL_S = 0.010, 0.060


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Serving:
    """Serving steps on a fake clock: decode steps of 8 sequences and, every 5th, a 1,024-token prefill;
    each `slowdown` times longer while training work is in flight."""

    def __init__(self, budget: LatencyBudget, clock: Clock):
        self.budget, self.clock, self.count = budget, clock, 0

    def step(self, slowdown: float = 1.0) -> None:
        self.count += 1
        prefill = 1024 if self.count % 5 == 0 else 0
        start = self.clock.now
        self.clock.now += (PREFILL_S if prefill else DECODE_S) * slowdown
        self.budget.serving_step(start, self.clock.now, prefill, 8)


def baseline(budget, serving, steps=20):
    for _ in range(steps):
        serving.step()
    budget.wait_after(0.0, serving=True)          # absorbed as baseline samples


def run_units(budget, serving, clock, slowdown, units=200):
    """Serving steps back to back on the fake clock; a training unit spans one of them (which runs
    `slowdown` times slower), then the wait the budget asks for (serving alone). Returns the training
    share of wall time."""
    start, busy = clock.now, 0.0
    for _ in range(units):
        budget.unit_begins()
        serving.step(slowdown)
        unit = budget.unit_ends()
        busy += unit
        waited_until = clock.now + budget.wait_after(unit, serving=True)
        while clock.now < waited_until:
            serving.step()
    return busy / (clock.now - start)


@pytest.fixture
def rig():
    clock = Clock()
    budget = LatencyBudget(1.15, clock=clock, initial_share=0.25, probe_every_s=1e9)
    serving = Serving(budget, clock)
    baseline(budget, serving)
    return budget, serving, clock


def test_admits_more_work_while_serving_stays_under_the_slo(rig):
    budget, serving, clock = rig
    run_units(budget, serving, clock, slowdown=1.05)
    assert budget.share == 1.0                    # 5% slower steps: under 1.15, training takes it all
    assert budget.ratio() == pytest.approx(1.05, rel=0.02)
    assert budget.wait_after(0.01, serving=True) == 0.0


def test_backs_off_when_serving_slows(rig):
    budget, serving, clock = rig
    share = run_units(budget, serving, clock, slowdown=1.6)
    assert budget.share <= 0.05                   # 60% slower steps: training backs off to a trickle
    assert budget.share >= MIN_SHARE
    assert share < 0.1
    assert budget.wait_after(0.01, serving=True) > 0.1


def test_recovers_when_serving_speeds_up_again(rig):
    budget, serving, clock = rig
    run_units(budget, serving, clock, slowdown=1.6)
    low = budget.share
    run_units(budget, serving, clock, slowdown=1.0, units=400)
    assert low < 0.1 and budget.share == 1.0


def test_full_speed_while_nothing_is_served(rig):
    budget, serving, clock = rig
    run_units(budget, serving, clock, slowdown=1.6)
    assert budget.share < 0.1
    assert budget.wait_after(0.05, serving=False) == 0.0    # idle server: no wait however low the share


def test_baseline_comes_from_steps_without_training_and_classes_are_kept_apart(rig):
    budget, serving, clock = rig
    assert len(budget.baseline) == 2               # decode-only and prefill steps: their own baselines
    decode = next(v for k, v in budget.baseline.items() if k[0] == 0)
    prefill = next(v for k, v in budget.baseline.items() if k[0] > 0)
    assert decode == pytest.approx(DECODE_S) and prefill == pytest.approx(PREFILL_S)
    budget.unit_begins()
    serving.step(slowdown=3.0)                     # overlapped training: a loaded sample, not a baseline
    budget.unit_ends()
    budget.wait_after(0.0, serving=True)
    assert next(v for k, v in budget.baseline.items() if k[0] == 0) == pytest.approx(DECODE_S)


def test_a_probe_pause_refreshes_the_baseline():
    clock = Clock()
    budget = LatencyBudget(1.15, clock=clock, initial_share=1.0, probe_every_s=2.0, probe_s=0.2)
    clock.now += 1.0
    assert budget.wait_after(0.01, serving=True) == 0.0       # share 1: no wait ...
    clock.now += 1.5
    assert budget.wait_after(0.01, serving=True) == pytest.approx(0.2)   # ... but a probe every 2 s


def test_without_baseline_the_share_holds():
    clock = Clock()
    budget = LatencyBudget(1.15, clock=clock, initial_share=0.25, probe_every_s=1e9)
    serving = Serving(budget, clock)
    budget.unit_begins()
    for _ in range(10):
        serving.step(slowdown=5.0)                 # no baseline for these classes yet: nothing to judge by
    budget.unit_ends()
    assert budget.wait_after(0.01, serving=True) == pytest.approx(0.03)
    assert budget.share == 0.25


def test_the_gate_lets_the_graph_capture_lock_go_while_it_waits():
    """The engine may capture decode graphs while the trainer thread waits (it issues no CUDA work)."""
    import threading
    import types

    import torch

    from trainer.background import TrainingGate
    from engine.step_signal import StepSignal

    clock = Clock()
    budget = LatencyBudget(1.15, clock=clock, initial_share=0.5, probe_every_s=1e9)
    lock = threading.Lock()
    port = types.SimpleNamespace(device=torch.device("cpu"), graph_capture_lock=lock, step_signal=StepSignal(),
                                 has_unfinished=lambda: True)
    seen = []
    gate = TrainingGate(port, budget, None, stop=types.SimpleNamespace(wait=lambda s: seen.append(lock.locked())))
    with lock:
        gate.holds_capture_lock = True
        gate.begin()
        clock.now += 0.01
        gate()                                      # share 0.5: waits as long as the unit took
        assert lock.locked()                        # held again afterwards
    assert seen == [False]


def test_the_gate_neither_syncs_nor_waits_while_nothing_is_served():
    import threading
    import types

    import torch

    from trainer.background import TrainingGate
    from engine.step_signal import StepSignal

    clock = Clock()
    budget = LatencyBudget(1.15, clock=clock, initial_share=0.02, probe_every_s=1e9)
    serving = [False]
    port = types.SimpleNamespace(device=torch.device("cpu"), graph_capture_lock=threading.Lock(),
                                 step_signal=StepSignal(), has_unfinished=lambda: serving[0])
    waits = []
    gate = TrainingGate(port, budget, None, stop=types.SimpleNamespace(wait=waits.append))
    gate.begin()
    clock.now += 0.01
    gate()
    assert waits == []                              # idle: full speed, however small the share
    serving[0] = True
    clock.now += 0.01
    gate()
    assert waits and waits[0] == pytest.approx(0.01 * (1 - 0.02) / 0.02)
