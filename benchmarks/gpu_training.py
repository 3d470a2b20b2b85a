"""Training throughput and memory on one GPU, side by side in one run (DESIGN §6, issue 4):
reuse (prefill captured), reuse (prefill+decode captured), own recompute, own recompute with
activation checkpointing, reuse with checkpointing, and HF transformers + PEFT, on the same ShareGPT
records (~8k tokens per step), LoRA r16 on all projections, 8B shape in bf16. The `_compiled` modes run
each layer's forward and backward as one torch.compile'd graph (trainer.compiled_layer).

    python -m benchmarks.gpu_training --out DIR [--sharegpt .bench/sharegpt.json] [--shape 8b|1b|tiny]
        [--only recompute,reuse_prefill_decode,reuse_prefill_decode_compiled] [--skip-hf] [--repeat 5]
        [--pool-cpu-gib 32: + reuse_host_hedged, reuse_host_naive (every row in the host tier; issue 18)]
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from benchmarks.common import LLAMA_1B, LLAMA_8B, blocking_sync, emit, git_commit, timed
from benchmarks.gpu_serving import DEVICE, make_engine
from engine.sampling_params import SamplingParams
from trainer.adapters import AdapterManager
from trainer.attention import varlen_applies
from trainer.compiled_layer import CompiledLayers
from trainer.graphed_layers import GraphedLayers
from trainer.fetch_planner import FetchPlanner, measure_rates
from trainer.lora import LoRAConfig
from trainer.reuse import TrainRecord
from trainer.step import forward_backward

SHAPES = {"8b": LLAMA_8B, "1b": LLAMA_1B,
          "tiny": dict(LLAMA_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)}


def pick_records(path: str, budget_tokens: int) -> list[dict]:
    out, total = [], 0
    for r in json.load(open(path)):
        n = len(r["prompt"]) + len(r["response"])
        if n > budget_tokens // 2 or len(r["response"]) < 2:
            continue
        if total + n > budget_tokens:
            break
        out.append(r)
        total += n
    return out


def capture(engine, raw: list[dict], full: bool, tag: str) -> list[TrainRecord]:
    """Serve each record once so the pool holds its rows: the prompt (prefill capture), or every
    training input row (prompt + response[:-1] teacher-forced through prefill: prefill+decode)."""
    records = []
    for i, r in enumerate(raw):
        served = r["prompt"] + r["response"][:-1] if full else r["prompt"]
        rid = f"{tag}-{i}"
        engine.add_request(rid, served, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                       detokenize=False))
        records.append(TrainRecord((rid, 0), r["prompt"], r["response"], [0.0] * len(r["response"])))
    while engine.has_unfinished():
        engine.step()
    for rec in records:
        engine.activation_pool.pin(rec.key)
    return records


def measure(fn, tokens: int, repeat: int) -> dict:
    """Median step time after a warm-up step, the warm-up's own time (compiling, for the `_compiled`
    modes) and peak memory above what was allocated before; an error is recorded."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    try:
        first, _ = timed(fn, warmup=0, repeat=1)       # the warm-up step: compiles what it needs
        cpu = time.thread_time()
        secs, _ = timed(fn, warmup=0, repeat=repeat)
        cpu = (time.thread_time() - cpu) / repeat
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err)[:200]}"}
    except Exception as err:                     # e.g. a compiled mode that does not compile here: say so
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    return {"step_s": secs, "tok_s": tokens / secs, "peak_extra_GiB": peak / 2 ** 30, "first_step_s": first,
            "host_cpu_s": cpu}


def ours(engine, manager, records, reuse: bool, checkpoint_layers: bool, attention: str = "auto",
         compiled: CompiledLayers | GraphedLayers | None = None, fetch_planner=None, buckets=None, masters=None):
    """One training step of a mode, as a function; its `grads()` are the LoRA gradients summed over the
    steps it ran ([n] fp32; None before the first)."""
    masters = masters if masters is not None else manager.masters(engine.adapter_version)
    adapters = manager.training_adapters(masters)

    def step():
        return forward_backward(engine.runner.model, records, adapters, pool=engine.activation_pool,
                                reuse=reuse, checkpoint_layers=checkpoint_layers, attention=attention,
                                compiled=compiled, fetch_planner=fetch_planner, buckets=buckets)
    tensors = [t for pair in masters.values() for t in pair]
    step.grads = lambda: None if tensors[0].grad is None else torch.cat([t.grad.float().flatten() for t in tensors])
    return step


def gradient_agreement(runs: dict, res: dict, reference) -> None:
    """Each measured mode's summed LoRA gradient against eager own recompute's (cosine: the number of
    steps summed does not matter), so that a fast mode with wrong gradients cannot pass for a result
    (session 7: a compiled mode ran at full speed with cosine 0.45)."""
    if reference.grads() is None:
        reference()
    ref = reference.grads()
    for name, fn in runs.items():
        grads = fn.grads()
        if grads is not None and "error" not in res[name]:
            res[name]["grad_cosine_vs_recompute"] = float(torch.nn.functional.cosine_similarity(grads, ref, dim=0))


def hf_peft_step(shape: dict, raw, checkpointing: bool, per_batch: int = 1):
    """HF transformers + PEFT LoRA r16 on all projections, random bf16 weights (speed does not depend
    on their values), `per_batch` records per forward (1: no padding waste; more: padded batches)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from benchmarks.common import llama_config
    with torch.device(DEVICE):
        hf = LlamaForCausalLM(llama_config(shape)).to(torch.bfloat16)
    if checkpointing:
        hf.gradient_checkpointing_enable()
        hf.enable_input_require_grads()
    model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    batches = [raw[i:i + per_batch] for i in range(0, len(raw), per_batch)]
    inputs = [_padded(chunk) for chunk in batches]

    def step():
        for ids, mask, labels in inputs:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return step


def _padded(chunk: list[dict]):
    """Right-padded ids/mask [B, L] and labels with -100 on prompt and padding positions."""
    width = max(len(r["prompt"]) + len(r["response"]) for r in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, r in enumerate(chunk):
        seq, p = r["prompt"] + r["response"], len(r["prompt"])
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, p:len(seq)] = torch.tensor(r["response"])
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def run_ours(args, raw, tokens: int, res: dict) -> None:
    engine = make_engine(SHAPES[args.shape], kv_gib=2, capture="prefill+decode",
                         activation_pool_bytes=int(args.pool_gib * (1 << 30)),
                         activation_pool_cpu_bytes=int(args.pool_cpu_gib * (1 << 30)),
                         enable_prefix_caching=False)   # each record is captured from position 0
    manager = AdapterManager(engine.runner.model, LoRAConfig(rank=16, alpha=32))
    hosted = capture(engine, raw, full=True, tag="h") if args.pool_cpu_gib else []
    for record in hosted:                   # every row of these in the pinned host tier (issue 18)
        engine.activation_pool.demote(record.key, tuple(engine.activation_pool.layout.dims), "cpu")
    prefill_only = capture(engine, raw, full=False, tag="p")
    full = capture(engine, raw, full=True, tag="f")
    res["pool"] = engine.activation_pool.stats()
    runs = {"reuse_prefill": ours(engine, manager, prefill_only, True, False),
            "reuse_prefill_decode": ours(engine, manager, full, True, False),
            "reuse_prefill_decode_ckpt": ours(engine, manager, full, True, True),
            "reuse_prefill_ckpt": ours(engine, manager, prefill_only, True, True),
            "recompute": ours(engine, manager, full, False, False),
            "recompute_ckpt": ours(engine, manager, full, False, True),
            # the same two main modes with SDPA once per record (what "auto" does where varlen is missing)
            "reuse_prefill_decode_per_record": ours(engine, manager, full, True, False, "per_record"),
            "recompute_per_record": ours(engine, manager, full, False, False, "per_record")}
    if hosted:                             # hedged: the planner fetches what lands in time; naive: all of it
        planner = FetchPlanner(measure_rates(engine.device, engine.activation_pool.layout.dtype))
        res["fetch_rates"] = {"h2d_GB_s": planner.rates.h2d_bytes_per_s / 1e9,
                              "gemm_TFLOP_s": planner.rates.flops_per_s / 1e12}
        runs.update({"reuse_host_hedged": ours(engine, manager, hosted, True, False, fetch_planner=planner),
                     "reuse_host_naive": ours(engine, manager, hosted, True, False)})
    compiled = CompiledLayers()            # each layer's forward + backward as one graph (the warm-up compiles)
    runs.update({f"{name}_compiled": ours(engine, manager, records, reuse, ckpt, compiled=compiled)
                 for name, records, reuse, ckpt in (("reuse_prefill", prefill_only, True, False),
                                                    ("reuse_prefill_decode", full, True, False),
                                                    ("reuse_prefill_decode_ckpt", full, True, True),
                                                    ("recompute", full, False, False))})
    if not args.only or "recompute_graphed" in args.only:
        runs["recompute_graphed"] = graphed_recompute(engine, manager, full, res)
    reference = runs["recompute"]
    if args.only:
        runs = {name: fn for name, fn in runs.items() if name in args.only}
    res["varlen_attention"] = varlen_applies(torch.empty(0, device=DEVICE, dtype=torch.bfloat16))
    for name, fn in runs.items():
        res[name] = measure(fn, tokens, args.repeat)
        print(name, json.dumps(res[name]), flush=True)
        if name == args.profile:
            profile(fn)
    gradient_agreement(runs, res, reference)


def graphed_recompute(engine, manager, records: list[TrainRecord], res: dict):
    """Recompute through the training layers' CUDA graphs (trainer/graphed_layers.py), captured here for
    one bucket that holds the step (a multiple of 256 tokens); the capture's time and memory in `res`."""
    tokens = sum(r.num_inputs for r in records)
    bucket = -(-tokens // 256) * 256
    masters = manager.masters(engine.adapter_version)
    graphs = GraphedLayers(engine.runner.model, manager.training_adapters(masters), [bucket], len(records) + 1,
                           capture=engine.device.type == "cuda")
    t = time.perf_counter()
    graphs.capture_all(engine.hf_config.hidden_size, torch.bfloat16)
    res["graphs"] = {"bucket": bucket, "capture_s": time.perf_counter() - t,
                     "memory_GiB": graphs.memory_bytes.get(bucket, 0) / 2 ** 30}
    step = ours(engine, manager, records, False, False, compiled=graphs, buckets=[bucket], masters=masters)
    step.graphs = graphs
    return step


def profile(fn) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize() if DEVICE == "cuda" else None
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70), flush=True)


def ratios(res: dict) -> dict:
    ok = lambda k: k in res and "tok_s" in res[k]
    out = {}
    for ref in ("recompute", "hf_peft"):
        if ok(ref):
            out[f"vs_{ref}"] = {k: res[k]["tok_s"] / res[ref]["tok_s"] for k in list(res)
                                if isinstance(res[k], dict) and ok(k)}
    if ok("recompute"):
        out["memory_vs_recompute"] = {k: res[k]["peak_extra_GiB"] / max(res["recompute"]["peak_extra_GiB"], 1e-9)
                                      for k in list(res) if isinstance(res[k], dict) and ok(k)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sharegpt", default=".bench/sharegpt.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--step-tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pool-gib", type=float, default=44.0)
    ap.add_argument("--pool-cpu-gib", type=float, default=0.0,
                    help="a pinned host tier this large; its records (prompt + response captured, then moved to "
                         "the host) train as reuse_host_hedged and reuse_host_naive")
    ap.add_argument("--blocking-sync", action="store_true",
                    help="the host sleeps while it waits for the GPU, so host_cpu_s is the step's own host work")
    ap.add_argument("--skip-hf", action="store_true", help="our modes only (no HF + PEFT baseline)")
    ap.add_argument("--profile", default=None, help="also print a kernel profile of one step of this mode")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None,
                    help="run only these of our modes (comma-separated names, e.g. recompute,recompute_compiled)")
    args = ap.parse_args()
    if args.blocking_sync:
        blocking_sync()
    raw = pick_records(args.sharegpt, args.step_tokens)
    p = sum(len(r["prompt"]) for r in raw)
    r = sum(len(x["response"]) for x in raw)
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "records": len(raw),
           "args": vars(args),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "prompt_tokens": p, "response_tokens": r, "ideal_reuse_prefill": 2 * (p + r) / (p + 2 * r)}
    tokens = p + r
    run_ours(args, raw, tokens, res)
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        res["after_ours_allocated_GiB"] = torch.cuda.memory_allocated() / 2 ** 30
    hf_modes = () if args.skip_hf else (("hf_peft", False, 1), ("hf_peft_batch4", False, 4), ("hf_peft_ckpt", True, 1))
    for name, ckpt, per_batch in hf_modes:
        res[name] = measure(hf_peft_step(SHAPES[args.shape], raw, ckpt, per_batch), tokens, args.repeat)
        print(name, json.dumps(res[name]), flush=True)
        gc.collect()
    res["ratios"] = ratios(res)
    emit(res, args.out, "gpu_training")


if __name__ == "__main__":
    main()
