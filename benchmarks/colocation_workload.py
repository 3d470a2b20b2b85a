"""The co-location benchmark's workload (benchmarks/gpu_colocation.py): ShareGPT records as (prompt,
max_tokens), their sampling parameters, and a seeded open-loop schedule of arrivals and ratings."""
from __future__ import annotations

import json
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


def schedule(workload, rate: float, duration: float, seed: int, feedback_share: float,
             opt_in: bool = False) -> list[dict]:
    """Poisson arrivals over [0, duration) s, the workload in file order; rated share and ratings seeded.
    `opt_in`: the requests that will be rated ask to be captured, the others not (a client that knows
    which answers it will ask feedback for); else the server's policy decides."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        prompt, max_tokens = workload[len(out) % len(workload)]
        rated = rng.random() < feedback_share
        out.append({"t": t, "prompt": prompt, "max_tokens": max_tokens,
                    "rating": rng.choice((1, -1)) if rated else None, "capture": rated if opt_in else None})
