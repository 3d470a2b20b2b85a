"""Synthetic background loads for the co-location benchmark: they load either the GPU or the Python
interpreter the way a trainer thread would, without training, so one run tells which of the two slows
serving (GPU contention vs the engine thread waiting for the GIL).

    burn-gpu[:duty=D]     bf16 GEMMs [2048, h] x [h, h] (compute-bound) on a stream of the lowest
                          priority, in ~10 ms bursts synced at their end, `duty` of the wall time
    burn-copy[:duty=D]    the same with 256 MiB copies (HBM-bandwidth-bound, like a trainer's
                          elementwise and gather kernels)
    burn-python[:duty=D]  pure-Python arithmetic (holds the GIL) in ~10 ms bursts, `duty` of the wall time
"""
from __future__ import annotations

import threading
import time

import torch

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
