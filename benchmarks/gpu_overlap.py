"""Overlapped scheduling against synchronous steps (issue 20, item 3), side by side in one job: decode
at batch 1 against the weight-bytes floor (`decode_b1.ratio`) and throughput on 64 × (512 + 128),
8B shape in bf16, random weights, each engine built in turn with `engine.overlap_scheduling` off / on.

    python3 -m benchmarks.gpu_overlap --out $OUT [--shape 8b] [--repeat 3]
"""
from __future__ import annotations

import argparse
import gc
import random
import time

import torch

from benchmarks.common import copy_bandwidth, emit, git_commit
from benchmarks.gpu_serving import DEVICE, decode_b1_entry, make_engine, ours_throughput
from benchmarks.gpu_training import SHAPES


def measure(shape: dict, overlap: bool, prompts: list[list[int]], out_len: int, repeat: int, copy_bps: float) -> dict:
    engine = make_engine(shape, kv_gib=24 if DEVICE == "cuda" else 0.25, overlap_scheduling=overlap)
    tok_s, secs, produced = ours_throughput(engine, prompts, [out_len] * len(prompts), repeat)
    entry = {"decode_b1": decode_b1_entry(engine, copy_bps), "throughput_tok_s": tok_s, "throughput_s": secs,
             "out_tokens": produced, "host_syncs": getattr(engine.runner, "num_host_syncs", None)}
    del engine
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return entry


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    copy_bps = copy_bandwidth() if DEVICE == "cuda" else 1e10
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
           "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    for overlap in (False, True):
        res["overlap" if overlap else "sync"] = measure(SHAPES[args.shape], overlap, prompts, args.out_len,
                                                        args.repeat, copy_bps)
    res["ratios"] = {"throughput_overlap_vs_sync": res["overlap"]["throughput_tok_s"] / res["sync"]["throughput_tok_s"],
                     "decode_b1_overlap_vs_sync": res["overlap"]["decode_b1"]["step_ms"] / res["sync"]["decode_b1"]["step_ms"]}
    emit(res, args.out, "gpu_overlap")
    return res


if __name__ == "__main__":
    main()
