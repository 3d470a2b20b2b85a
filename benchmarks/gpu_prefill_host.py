"""Is a prefill step host-bound? For one fresh prompt per sample (8B shape, bf16, random weights), per
mode (capture mode[:variant]; `:unfused` runs the cheap ops as plain torch ops instead of the
torch.compile'd fused ones, `:lora` / `:lora-separate` serve with LoRA as in benchmarks.gpu_capture):
the host time from the start of the model forward (GPU idle: synchronized before) until
the forward returns, against the time until its kernels are done; the host syncs of one TTFT (CUDA
sync debug mode, by source line); and with `--cprofile` the functions that take the forward's host
time. Host launch ≈ done means the GPU waited for the host.

    python -m benchmarks.gpu_prefill_host --out DIR [--prompt-len 1024] [--samples 8] [--cprofile]
        [--modes none,prefill,none:unfused,none:lora,none:lora-separate]
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import random
import statistics
import time
import warnings

import torch

from benchmarks.common import emit, git_commit
from benchmarks.gpu_capture import add_lora, ttft
from benchmarks.gpu_serving import make_engine
from benchmarks.gpu_training import SHAPES
from engine import layers


def launch_vs_done(engine, rng: random.Random, prompt_len: int, samples: int) -> list[tuple[float, float, float]]:
    """[(host ms until the forward returned, ms until its kernels finished, TTFT ms)] per prompt (the GPU
    is synchronized before the forward, so TTFT here includes that wait)."""
    model, marks, rows = engine.runner.model, {}, []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def before(*_):
        sync()
        marks["start"] = time.perf_counter()

    def after(*_):
        marks["launch"] = time.perf_counter() - marks["start"]
        sync()
        marks["done"] = time.perf_counter() - marks["start"]
    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        for _ in range(samples):
            wall, _ = ttft(engine, rng, prompt_len)
            rows.append((marks["launch"] * 1e3, marks["done"] * 1e3, wall * 1e3))
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def host_syncs(engine, rng: random.Random, prompt_len: int) -> dict[str, int]:
    if not torch.cuda.is_available():
        return {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ttft(engine, rng, prompt_len)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return dict(collections.Counter(f"{w.filename}:{w.lineno}" for w in caught))


def host_profile(engine, rng: random.Random, prompt_len: int, samples: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(samples):
        ttft(engine, rng, prompt_len)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--modes", default="none,prefill",
                    help="capture mode[:unfused|:lora|:lora-separate], comma-separated")
    ap.add_argument("--cprofile", action="store_true", help="also print the top host functions (capture prefill)")
    args = ap.parse_args()
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
           "prompt_len": args.prompt_len, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mode in args.modes.split(","):
        capture, _, variant = mode.partition(":")
        layers.FUSE = variant != "unfused"          # modes run one after another: the flag is this mode's
        engine = make_engine(SHAPES[args.shape], kv_gib=4, capture=capture, activation_pool_bytes=8 << 30)
        add_lora(engine, mode)
        rng = random.Random(0)
        for _ in range(3):                                      # warm-up: compile, pool pages
            ttft(engine, rng, args.prompt_len)
        rows = launch_vs_done(engine, rng, args.prompt_len, args.samples)
        res[mode] = {"forward_host_launch_ms": [round(row[0], 2) for row in rows],
                     "forward_done_ms": [round(row[1], 2) for row in rows],
                     "median_launch_ms": statistics.median(row[0] for row in rows),
                     "median_done_ms": statistics.median(row[1] for row in rows),
                     "median_ttft_ms": statistics.median(row[2] for row in rows),
                     "host_syncs_in_one_ttft": host_syncs(engine, rng, args.prompt_len)}
        print(mode, {k: round(v, 2) for k, v in res[mode].items() if k.startswith("median")},
              res[mode]["host_syncs_in_one_ttft"], flush=True)
        if args.cprofile and mode != "none":
            print(host_profile(engine, rng, args.prompt_len, 5), flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    layers.FUSE = True
    emit(res, args.out, "gpu_prefill_host")


if __name__ == "__main__":
    main()
