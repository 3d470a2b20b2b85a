"""The co-location benchmark's workload (benchmarks/gpu_colocation.py): ShareGPT records as (prompt,
max_tokens), their sampling parameters, and a seeded open-loop schedule of arrivals and ratings."""
from __future__ import annotations

import heapq
import json
import math
import random

from engine.sampling_params import SamplingParams


def params(max_tokens: int, capture: bool | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          capture=capture)


def load_workload(path: str, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt: last 1024 ids mod vocab, max_tokens: min(len(response), 256)) per ShareGPT record."""
    out = []
    for r in json.load(open(path)):
        if r["prompt"] and r["response"]:
            out.append(([t % vocab for t in r["prompt"][-1024:]], min(len(r["response"]), 256)))
    return out


def rating_delay(spec: str):
    """`none` (a rating the moment its answer ends) or `lognormal:MEDIAN:P90` in seconds -> a function
    of a random.Random giving one delay."""
    if spec == "none":
        return lambda rng: 0.0
    kind, *numbers = spec.split(":")
    if kind != "lognormal" or len(numbers) != 2 or not 0 < float(numbers[0]) < float(numbers[1]):
        raise ValueError(f"--rating-delay {spec!r}: use none or lognormal:MEDIAN:P90 (0 < median < p90)")
    median, p90 = map(float, numbers)
    sigma = math.log(p90 / median) / 1.2815515655446004        # z of the 90th percentile
    return lambda rng: rng.lognormvariate(math.log(median), sigma)


def schedule(workload, rate: float, duration: float, seed: int, feedback_share: float,
             opt_in: bool = False, delay: str = "none") -> list[dict]:
    """Poisson arrivals over [0, duration) s, the workload in file order; rated share and ratings seeded.
    `opt_in`: the requests that will be rated ask to be captured, the others not (a client that knows
    which answers it will ask feedback for); else the server's policy decides. `delay`: when a rating
    comes after its answer ended (rating_delay; drawn from a stream of its own, so the arrivals and
    ratings of a seed are the same whatever the delay)."""
    rng, delays, draw, t, out = random.Random(seed), random.Random(seed + 7919), rating_delay(delay), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        prompt, max_tokens = workload[len(out) % len(workload)]
        rated = rng.random() < feedback_share
        out.append({"t": t, "prompt": prompt, "max_tokens": max_tokens,
                    "rating": rng.choice((1, -1)) if rated else None, "capture": rated if opt_in else None,
                    "delay": draw(delays) if rated else None})


class RatingQueue:
    """Ratings waiting for their time: (due, key, rating) in a heap; `due(now)` pops those whose time came."""

    def __init__(self):
        self._heap: list[tuple[float, int, object, int]] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, key, rating: int) -> None:
        self._count += 1
        heapq.heappush(self._heap, (due, self._count, key, rating))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[object, int]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key, rating = heapq.heappop(self._heap)
            out.append((key, rating))
        return out
