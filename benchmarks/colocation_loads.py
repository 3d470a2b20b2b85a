"""What runs beside serving in the co-location benchmark's `on` runs, and the latency summary of a run.

`use_mode` switches the online trainer between modes (`thread` / `interleaved`, duty cycle, yield,
SM share). The synthetic background loads load either the GPU or the Python interpreter the way a
trainer thread would, without training, so one run tells which of the two slows serving (GPU
contention vs the engine thread waiting for the GIL):

    burn-gpu[:duty=D]     bf16 GEMMs [2048, h] x [h, h] (compute-bound) on a stream of the lowest
                          priority, in ~10 ms bursts synced at their end, `duty` of the wall time
    burn-copy[:duty=D]    the same with 256 MiB copies (HBM-bandwidth-bound, like a trainer's
                          elementwise and gather kernels)
    burn-python[:duty=D]  pure-Python arithmetic (holds the GIL) in ~10 ms bursts, `duty` of the wall time
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import Counter

import numpy as np
import torch

from trainer.background import TrainerThread
from trainer.pacing import StepPacing

BURST_S = 0.01


class Burn:
    def __init__(self, kind: str, duty: float, device: torch.device, hidden: int):
        if kind not in ("gpu", "copy", "python") or not 0 < duty <= 1:
            raise ValueError(f"burn-{kind}:duty={duty}: use burn-gpu, burn-copy or burn-python, duty in (0, 1]")
        self.kind, self.duty, self.device, self.hidden = kind, duty, device, hidden
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"burn-{kind}", daemon=True)
        self.busy_s = 0.0

    @classmethod
    def from_mode(cls, mode: str, device: torch.device, hidden: int) -> "Burn":
        kind, *options = mode.removeprefix("burn-").split(":")
        opts = dict(o.split("=", 1) for o in options)
        return cls(kind, float(opts.get("duty", 0.5)), device, hidden)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        burst = self._python_burst if self.kind == "python" else self._gpu_burst(self.kind)
        while not self._stop.is_set():
            t = time.perf_counter()
            burst()
            spent = time.perf_counter() - t
            self.busy_s += spent
            time.sleep(spent * (1 / self.duty - 1))

    def _gpu_burst(self, kind: str):
        stream = torch.cuda.Stream(self.device, priority=0) if self.device.type == "cuda" else None
        if kind == "gpu":
            a = torch.randn(2048, self.hidden, device=self.device, dtype=torch.bfloat16)   # [n, h]
            b = torch.randn(self.hidden, self.hidden, device=self.device, dtype=torch.bfloat16)   # [h, h]
            work = lambda: torch.mm(a, b)
        else:
            n = (256 << 20) // 2 if self.device.type == "cuda" else 1 << 20
            src, dst = (torch.empty(n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
            work = lambda: dst.copy_(src)
        reps = 1

        def burst() -> None:
            nonlocal reps
            t = time.perf_counter()
            with torch.cuda.stream(stream) if stream is not None else torch.no_grad():
                for _ in range(reps):
                    work()
                if stream is not None:
                    stream.synchronize()
            if time.perf_counter() - t < BURST_S / 2:          # grow to ~BURST_S per burst
                reps *= 2
        return burst

    @staticmethod
    def _python_burst() -> None:
        end, x = time.perf_counter() + BURST_S, 0
        while time.perf_counter() < end:
            for i in range(200):
                x += i * i


def use_mode(trainer, mode: str) -> None:
    """`concurrency[:slo=R|none][:duty=D][:yield=N|none][:sms=F|none][:switch=MS]`, e.g. thread:slo=none:duty=0.25:
    yield=256 (before the latency budget): where and how the trainer's steps run from now on (an option left
    out keeps the config's default)."""
    concurrency, *options = mode.split(":")
    opts = dict(o.split("=", 1) for o in options)
    number = lambda key, cast: None if opts[key] == "none" else cast(opts[key])
    if not hasattr(trainer, "base_config"):      # options left out: the defaults, not the last mode's
        trainer.base_config = trainer.config
    config = trainer.base_config
    trainer.stop()
    trainer.config = dataclasses.replace(
        config, concurrency=concurrency, tbt_slo_ratio=number("slo", float) if "slo" in opts else config.tbt_slo_ratio,
        duty_cycle=float(opts["duty"]) if "duty" in opts else config.duty_cycle,
        yield_prefill_tokens=number("yield", int) if "yield" in opts else config.yield_prefill_tokens,
        sm_share=number("sms", float) if "sms" in opts else config.sm_share,
        switch_interval_ms=float(opts.get("switch", config.switch_interval_ms)))
    sys.setswitchinterval(trainer.config.switch_interval_ms / 1e3)   # the thread only ever lowers it
    trainer.pacing = StepPacing(trainer.config, concurrency == "thread")
    trainer.thread = TrainerThread(trainer) if concurrency == "thread" else None
    trainer.start()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(raw: dict, duration: float, totals_before: Counter) -> dict:
    """Latencies in ms over all requests of the run; rates over the arrival window [0, duration) s."""
    ttft = [(ts[0] - raw["arrivals"][r]) * 1e3 for r, ts in raw["tokens"].items() if ts]
    tbt = [(b - a) * 1e3 for ts in raw["tokens"].values() for a, b in zip(ts, ts[1:])]
    in_window = sum(t < duration for ts in raw["tokens"].values() for t in ts)
    w = raw["window_totals"] - totals_before   # trainer totals reached by the end of the window
    trained = w["tokens_reuse"] + w["tokens_recompute"]
    return {"requests": len(raw["tokens"]), "finished_in_window": sum(bool(ts) and ts[-1] < duration
                                                                      for ts in raw["tokens"].values()),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tbt_p50_ms": pct(tbt, 50), "tbt_p99_ms": pct(tbt, 99), "tbt_max_ms": max(tbt, default=0.0),
            "tbt_samples": len(tbt), "rated": raw["rated"],
            "out_tok_s": in_window / duration, "elapsed_s": raw["elapsed_s"], "train_steps": w["steps"],
            "train_steps_incl_drain": (raw["final_totals"] - totals_before)["steps"],
            "trained_tokens": trained, "trained_tok_s": trained / duration,
            "reuse_tokens": w["tokens_reuse"], "recompute_tokens": w["tokens_recompute"],
            "train_busy_frac": w["seconds"] / duration, "train_step_ms": w["seconds"] * 1e3 / max(w["steps"], 1),
            "train_cpu_ms_per_step": w["cpu_seconds"] * 1e3 / max(w["steps"], 1),
            "outcomes": {k[8:]: v for k, v in w.items() if k.startswith("outcome_")},
            **engine_steps(raw.get("steps", []))}


def engine_steps(steps: list[tuple[float, float, int, bool]]) -> dict:
    """Where TBT goes: engine step times (decode-only vs with prompt tokens; decode-only split by whether
    a training step was under way), the host gap between steps, and the slowest iterations."""
    if not steps:
        return {}
    ms = lambda xs: {"p50": pct(xs, 50), "p99": pct(xs, 99), "n": len(xs)}
    dur = [(end - start) * 1e3 for start, end, _, _ in steps]
    decode = [d for d, (_, _, p, _) in zip(dur, steps) if p == 0]
    gaps = [(b[0] - a[1]) * 1e3 for a, b in zip(steps, steps[1:])]
    slowest = sorted(range(len(steps) - 1), key=lambda i: steps[i + 1][1] - steps[i][1], reverse=True)[:8]
    return {"engine_step_ms": {
        "decode": ms(decode), "with_prompt": ms([d for d, s in zip(dur, steps) if s[2] > 0]),
        "decode_while_training": ms([d for d, s in zip(dur, steps) if s[2] == 0 and s[3]]),
        "decode_while_idle": ms([d for d, s in zip(dur, steps) if s[2] == 0 and not s[3]]),
        "gap_between_steps": ms(gaps)},
        "slowest_iterations": [{"t_s": steps[i + 1][0], "ms": (steps[i + 1][1] - steps[i][1]) * 1e3,
                                "gap_ms": gaps[i], "prompt_tokens": steps[i + 1][2], "training": steps[i + 1][3]}
                               for i in slowest]}


def drain_backlog(state, hooks, timeout: float = 300.0) -> None:
    """Train every pending rating with no serving traffic (the trainer at full speed), until no step is
    under way and the last version is live."""
    trainer, deadline = state.trainer, time.monotonic() + timeout
    while trainer.pending_count() > 0 and state.train_error is None and time.monotonic() < deadline:
        for hook in hooks:
            hook()
        time.sleep(0.01)
    with trainer.lock:                           # a step under way has ended
        pass
    for hook in hooks:                           # the last version goes live
        hook()
