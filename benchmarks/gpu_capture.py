"""Capture overhead on one GPU, side by side in one run (DESIGN §6, issue 4): TTFT and decode step time
with capture none vs prefill vs prefill+decode (and, in `--modes`, `prefill:side`: the copies on a side
stream, `prefill:copy`: rows always copied, never written in place, and the `:lora` variants: serving with
LoRA on every projection, packed per group or `lora-separate`), 8B shape in bf16, random weights.

One engine per mode lives at once (same shape, each its own random weights: speed does not depend on
values) and the measurements interleave the modes sample by sample, in a rotating order, so drift and
position hit all alike. `--control` adds a second capture-none engine: its ratio to none is the noise
floor of the method (an A/A comparison). `--profile N` adds, per mode, the CUDA kernel time of N more
TTFT prompts under torch.profiler, and the kernels whose time differs most from none's; `--phases N`
the host time of each step phase (benchmarks.step_phases) over N more.
TTFT = one fresh prompt alone, from add_request to its first token: wall time, and the GPU time of its
prefill step (CUDA events on the serving stream around the step; host noise — Python, the allocator,
GC — does not enter it); `--ttft-samples` of each, the ratio of medians and the median of the paired
per-sample ratios. Decode step = the median step of a batch of `--batch` sequences once every
prefill is done.

    python -m benchmarks.gpu_capture --out DIR [--shape 8b] [--rounds 5] [--ttft-samples 40] [--control]
        [--profile 4] [--modes none,prefill,prefill+decode]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import GcClock, emit, git_commit, kernel_times
from benchmarks.gpu_serving import make_engine
from benchmarks.gpu_training import SHAPES
from benchmarks.step_phases import StepPhases
from engine.sampling_params import SamplingParams

# capture mode[:variant]; "prefill:side" copies prompt steps' rows on a side stream (capture_stream),
# "prefill:copy" copies every step's rows (never lets the projections write the pool in place),
# "none:control" is a second engine without capture (the A/A noise floor); ":lora" variants serve with
# LoRA r16 on every projection (as while training), a group's adapters packed into two GEMMs, and
# ":lora-separate" with two GEMMs per projection (the serving path before packing); ":lora-triton" and
# ":lora-folded" serve the packed adapters with that engine.lora_kernel (engine/kernels/lora.py)
MODES = ("none", "prefill", "prefill:side", "prefill:copy", "prefill+decode", "none:control",
         "none:lora", "none:lora-separate", "prefill:lora", "none:lora-triton", "none:lora-folded",
         "prefill:lora-folded")
LORA_KERNEL_OF = {"lora": "torch", "lora-triton": "triton", "lora-folded": "folded"}


def engine_options(mode: str) -> dict:
    capture, _, variant = mode.partition(":")
    return dict(capture=capture, capture_stream="side" if variant == "side" else "serving",
                lora_kernel=LORA_KERNEL_OF.get(variant, "torch"))


def add_lora(engine, mode: str) -> None:
    """LoRA r16 on every projection of a `:lora` mode's engine (B = 0: the outputs do not change, the
    kernels run); `:lora-separate` unpacks each group's adapters (per-projection GEMMs)."""
    from trainer.adapters import AdapterManager
    from trainer.lora import LoRAConfig
    variant = mode.partition(":")[2]
    if not variant.startswith("lora"):
        return
    AdapterManager(engine.runner.model, LoRAConfig(rank=16, alpha=32))
    if variant == "lora-separate":
        for module in engine.runner.model.modules():
            if getattr(module, "packed_lora", None) is not None:
                module.packed_lora = None
    engine.runner.invalidate_graphs()                  # decode graphs captured again, with the adapters


def kernel_diff(engines: dict, rng: random.Random, prompt_len: int, prompts: int) -> dict:
    """Per mode: CUDA kernel ms and launches per TTFT prompt, and the 12 kernels whose time differs
    most from capture none's."""
    times = {m: kernel_times(lambda: ttft(engine, rng, prompt_len), prompts) for m, engine in engines.items()}
    out = {}
    for m, kernels in times.items():
        base = times["none"]
        delta = {k: kernels.get(k, (0, 0))[0] - base.get(k, (0, 0))[0] for k in set(kernels) | set(base)}
        top = sorted(delta, key=lambda k: -abs(delta[k]))[:12]
        out[m] = {"kernel_ms": sum(t for t, _ in kernels.values()) / 1e3,
                  "launches": sum(n for _, n in kernels.values()),
                  "vs_none_us": {k[:90]: [round(delta[k], 1), kernels.get(k, (0, 0))[1]] for k in top}}
    return out


def ttft(engine, rng: random.Random, prompt_len: int) -> tuple[float, float]:
    """(wall s from add_request to the first token, GPU s of the steps) of one fresh prompt (no
    prefix-cache hit); GPU time from CUDA events on the serving stream (0 on the CPU)."""
    prompt = [rng.randrange(1000, engine.hf_config.vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    stream = engine.runner.stream
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if stream is not None else None
    start = time.perf_counter()
    engine.add_request(f"ttft-{rng.random()}", prompt, params)
    if events:
        events[0].record(stream)
    while engine.has_unfinished():
        engine.step()
    if events:
        events[1].record(stream)
    wall = time.perf_counter() - start
    if not events:
        return wall, 0.0
    events[1].synchronize()
    return wall, events[0].elapsed_time(events[1]) / 1e3


def decode_step(engine, rng: random.Random, batch: int, prompt_len: int, steps: int) -> float:
    """Median seconds of one decode step with `batch` running sequences."""
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    for i in range(batch):
        prompt = [rng.randrange(1000, engine.hf_config.vocab_size) for _ in range(prompt_len)]
        engine.add_request(f"dec-{rng.random()}-{i}", prompt, params)
    times = []
    while engine.has_unfinished():
        prefilling = any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        t = time.perf_counter()
        engine.step()
        if not prefilling:
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def sample_ttft(engines: dict, modes: list[str], rng: random.Random, prompt_len: int, count: int):
    """`count` TTFT samples per mode, every mode once per sample in a rotating order; the GC time of
    each; and per mode how many prompt steps were written in place (one run of slots) or copied."""
    samples = {m: {"ttft": [], "ttft_gpu": [], "decode": [], "gc": []} for m in modes}
    steps = lambda m: dict(engines[m].capture.steps) if engines[m].capture else {}
    before = {m: steps(m) for m in modes}
    with GcClock() as clock:
        for i in range(count):
            for m in modes[i % len(modes):] + modes[:i % len(modes)]:
                gc_before = clock.seconds
                wall, gpu = ttft(engines[m], rng, prompt_len)
                samples[m]["ttft"].append(wall)
                samples[m]["ttft_gpu"].append(gpu)
                samples[m]["gc"].append(clock.seconds - gc_before)
    return samples, {m: {k: n - before[m][k] for k, n in steps(m).items()} for m in modes}


def summarize(engines: dict, modes: list[str], samples: dict, ttft_steps: dict) -> dict:
    """Medians per mode, and per mode other than none its ratios to none (of medians, and the median
    of the paired per-sample ratios)."""
    res = {}
    ms = lambda xs: statistics.median(xs) * 1e3
    for m in modes:
        res[m] = {"ttft_ms": ms(samples[m]["ttft"]), "ttft_gpu_ms": ms(samples[m]["ttft_gpu"]),
                  "ttft_ms_quartiles": [q * 1e3 for q in statistics.quantiles(samples[m]["ttft"], n=4)],
                  "decode_step_ms": ms(samples[m]["decode"]),
                  "ttft_gc_ms": {"total": sum(samples[m]["gc"]) * 1e3, "max": max(samples[m]["gc"]) * 1e3,
                                 "samples_with_gc": sum(1 for g in samples[m]["gc"] if g)},
                  "ttft_capture_steps": ttft_steps[m],           # written in place (one_run) or copied
                  "pool": engines[m].activation_pool.stats() if engines[m].activation_pool else None}
    gpu_timed = bool(res["none"]["ttft_gpu_ms"])
    for m in modes[1:]:
        paired = lambda key: statistics.median(a / b for a, b in zip(samples[m][key], samples["none"][key]) if b)
        res[f"{m}_vs_none"] = {"ttft": res[m]["ttft_ms"] / res["none"]["ttft_ms"],
                               "ttft_paired": paired("ttft"),
                               "ttft_gpu": res[m]["ttft_gpu_ms"] / res["none"]["ttft_gpu_ms"] if gpu_timed else None,
                               "ttft_gpu_paired": paired("ttft_gpu") if gpu_timed else None,
                               "decode_step": res[m]["decode_step_ms"] / res["none"]["decode_step_ms"]}
    overhead = {LORA_KERNEL_OF[m.partition(":")[2]]: {"ttft": res[f"{m}_vs_none"]["ttft"],
                                                       "decode_step": res[f"{m}_vs_none"]["decode_step"]}
                for m in modes if m.startswith("none:lora") and m != "none:lora-separate"}
    if overhead:                        # LoRA on / off per engine.lora_kernel; `lora_overhead`: the default's
        res["lora_overhead_by_kernel"] = overhead
        res["lora_overhead"] = overhead.get("torch", next(iter(overhead.values())))
    if {"none:lora", "none:lora-separate"} <= set(modes):      # packed adapters against separate ones
        packed, separate = res["none:lora"], res["none:lora-separate"]
        res["lora_packed_vs_separate"] = {key: packed[f"{key}_ms"] / separate[f"{key}_ms"]
                                          for key in ("ttft", "ttft_gpu", "decode_step") if separate[f"{key}_ms"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--pool-gib", type=float, default=8.0)
    ap.add_argument("--ttft-samples", type=int, default=40, help="TTFT samples per mode, interleaved")
    ap.add_argument("--modes", default="none,prefill,prefill+decode", help=f"from {','.join(MODES)}")
    ap.add_argument("--control", action="store_true", help="add none:control, a second engine without capture")
    ap.add_argument("--profile", type=int, default=0, help="profile this many more TTFT prompts per mode")
    ap.add_argument("--phases", type=int, default=0,
                    help="host time of the step phases over this many more TTFT prompts")
    args = ap.parse_args()
    modes = list(dict.fromkeys(["none"] + args.modes.split(",") + (["none:control"] if args.control else [])))
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    engines = {m: make_engine(SHAPES[args.shape], kv_gib=args.kv_gib, **engine_options(m),
                              activation_pool_bytes=int(args.pool_gib * (1 << 30)))
               for m in modes}
    for m in modes:
        if m.endswith(":copy"):
            engines[m].capture.run_start = lambda slots: None    # no step is written in place
        add_lora(engines[m], m)
    rng = random.Random(0)
    for m in modes:                                        # warm-up: compile, CUDA graphs, pool pages
        ttft(engines[m], rng, args.prompt_len)
        decode_step(engines[m], rng, args.batch, 128, 8)
    samples, ttft_steps = sample_ttft(engines, modes, rng, args.prompt_len, args.ttft_samples)
    for r in range(args.rounds):
        for m in modes:
            samples[m]["decode"].append(decode_step(engines[m], rng, args.batch, 128, args.steps))
        print(f"round {r}: " + ", ".join(f"{m} decode {samples[m]['decode'][-1] * 1e3:.3f} ms" for m in modes),
              flush=True)
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "prompt_len": args.prompt_len, "decode_batch": args.batch, "rounds": args.rounds,
           "ttft_samples": args.ttft_samples}
    res.update(summarize(engines, modes, samples, ttft_steps))
    for m in modes if args.phases else ():                 # mode by mode, not interleaved: within a mode
        with StepPhases(engines[m]) as phases:
            for _ in range(args.phases):
                ttft(engines[m], rng, args.prompt_len)
        res[m]["ttft_phases_ms"] = phases.medians_ms()
    if args.profile:
        res["kernels"] = kernel_diff(engines, rng, args.prompt_len, args.profile)
    emit(res, args.out, "gpu_capture")


if __name__ == "__main__":
    main()
