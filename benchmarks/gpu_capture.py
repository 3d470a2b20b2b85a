"""Capture overhead on one GPU, side by side in one run (DESIGN §6, issue 4): TTFT and decode step time
with capture none vs prefill vs prefill+decode, 8B shape in bf16, random weights.

Three engines live at once (same shape, each its own random weights: speed does not depend on values)
and the measurements interleave none/prefill/prefill+decode round by round, so drift hits all alike.
TTFT = one fresh prompt alone, from add_request to its first token; decode step = the median step of
a batch of `--batch` sequences once every prefill is done.

    python -m benchmarks.gpu_capture --out DIR [--shape 8b] [--rounds 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import emit, git_commit
from benchmarks.gpu_serving import make_engine
from benchmarks.gpu_training import SHAPES
from engine.sampling_params import SamplingParams

MODES = ("none", "prefill", "prefill+decode")


def ttft(engine, rng: random.Random, prompt_len: int) -> float:
    """Seconds from add_request to the first token of one fresh prompt (no prefix-cache hit)."""
    prompt = [rng.randrange(1000, engine.hf_config.vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    engine.add_request(f"ttft-{rng.random()}", prompt, params)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def decode_step(engine, rng: random.Random, batch: int, prompt_len: int, steps: int) -> float:
    """Median seconds of one decode step with `batch` running sequences."""
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"dec-{rng.random()}-{i}", [rng.randrange(1000, engine.hf_config.vocab_size) for _ in range(prompt_len)], params)
    times = []
    while engine.has_unfinished():
        prefilling = any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        t = time.perf_counter()
        engine.step()
        if not prefilling:
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ttft-per-round", type=int, default=4)
    args = ap.parse_args()
    engines = {m: make_engine(SHAPES[args.shape], kv_gib=4, capture=m, activation_pool_bytes=8 << 30)
               for m in MODES}
    rng = random.Random(0)
    for m in MODES:                                        # warm-up: compile, CUDA graphs, pool pages
        ttft(engines[m], rng, args.prompt_len)
        decode_step(engines[m], rng, args.batch, 128, 8)
    samples = {m: {"ttft": [], "decode": []} for m in MODES}
    for r in range(args.rounds):
        for m in MODES:
            samples[m]["ttft"] += [ttft(engines[m], rng, args.prompt_len) for _ in range(args.ttft_per_round)]
            samples[m]["decode"].append(decode_step(engines[m], rng, args.batch, 128, args.steps))
        print(f"round {r}: " + ", ".join(f"{m} ttft {samples[m]['ttft'][-1] * 1e3:.2f} ms decode "
                                          f"{samples[m]['decode'][-1] * 1e3:.3f} ms" for m in MODES), flush=True)
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "prompt_len": args.prompt_len, "decode_batch": args.batch, "rounds": args.rounds}
    for m in MODES:
        res[m] = {"ttft_ms": statistics.median(samples[m]["ttft"]) * 1e3,
                  "decode_step_ms": statistics.median(samples[m]["decode"]) * 1e3,
                  "pool": engines[m].activation_pool.stats() if engines[m].activation_pool else None}
    for m in MODES[1:]:
        res[f"{m}_vs_none"] = {"ttft": res[m]["ttft_ms"] / res["none"]["ttft_ms"],
                               "decode_step": res[m]["decode_step_ms"] / res["none"]["decode_step_ms"]}
    emit(res, args.out, "gpu_capture")


if __name__ == "__main__":
    main()
