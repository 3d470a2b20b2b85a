"""Host cost of one serving projection call (`ServingContext.project` for q|k|v of a tiny Llama layer,
4 tokens, one thread): the Python and dispatch overhead a host-bound prefill pays per projection group,
side by side for bases separate or packed, without LoRA or with it (adapters separate, or packed per
group as engine.packing.pack_lora does over packed bases), against the bare packed GEMM + split.

    python -m benchmarks.cpu_project_host [--calls 20000]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from engine.context import ServingContext
from engine.packing import pack_model, pack_model_lora
from trainer.check_grad import adapted_engine, build_engine


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def model_for(variant: str):
    """variant: {plain, lora}-{separate, packed} (bases packed in both `packed` variants)."""
    with_lora, packing = variant.split("-")
    if with_lora == "lora":
        engine, _ = adapted_engine("tiny-llama", "none", 0, torch.Generator().manual_seed(0))
    else:
        engine = build_engine("tiny-llama", "none", 0)
    model = engine.runner.model
    if packing == "packed":
        pack_model(model)
        pack_model_lora(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = ServingContext(attn=None, kv_caches=[], block_size=16)
    res = {}
    with torch.inference_mode():
        for variant in ("plain-separate", "plain-packed", "lora-separate", "lora-packed"):
            attn = model_for(variant).model.layers[0].self_attn
            modules = (attn.q_proj, attn.k_proj, attn.v_proj)
            x = torch.randn(4, attn.q_proj.in_features)
            res[variant] = per_call_us(lambda: ctx.project(0, ("q", "k", "v"), modules, x), args.calls)
            if variant == "plain-packed":
                weight, bias = attn.q_proj.packed
                sizes = [m.out_features for m in modules]
                res["bare_packed_gemm_split"] = per_call_us(
                    lambda: F.linear(x, weight, bias).split(sizes, dim=-1), args.calls)
    print(json.dumps({k: round(v, 2) for k, v in res.items()}))


if __name__ == "__main__":
    main()
