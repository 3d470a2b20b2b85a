"""Where a batch-1 decode step goes (8B shape, bf16): full step vs CUDA-graph replay vs the GEMVs
alone (separate and fused q|k|v, gate|up), and logits vs HF in bf16 against an fp32 reference.

    python -m benchmarks.gpu_decode_profile --out OUT_DIR
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import LLAMA_1B, LLAMA_8B, copy_bandwidth, emit, event_time, git_commit, llama_config
from benchmarks.gpu_serving import _last_logits, hf_twin, make_engine
from common.model_shape import head_dim
from engine.sampling_params import SamplingParams


def step_breakdown(engine) -> dict:
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, detokenize=False)
    engine.add_request("p", [random.randrange(1000, 100000) for _ in range(512)], params)
    runner = engine.runner
    parts = {"schedule": [], "prepare": [], "graph": [], "sample+sync": [], "post": []}
    for _ in range(3):
        engine.step()
    while engine.has_unfinished():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        capture = engine.capture.begin(batch) if engine.capture is not None else None
        input_ids, positions, ctx, _ = runner.prepare(batch, capture)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        with torch.inference_mode():
            logits = runner.graphs.run(input_ids, positions, ctx)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        from engine.sampler import sample
        with torch.inference_mode():
            ids, lps, top = sample(logits, runner.sampling_metadata(batch.seqs))
            results = runner._results(batch, ids, lps, top)
        t4 = time.perf_counter()
        engine.scheduler.postprocess(batch, results)
        engine._process_outputs(batch.seqs, results)
        t5 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k].append(v * 1e3)
    graph, _ = runner.graphs.graphs[1]
    out = {k + "_ms": statistics.median(v) for k, v in parts.items()}
    out["graph_replay_only_ms"] = event_time(graph.replay) * 1e3
    return out


def gemv_floor(shape: dict) -> dict:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    hd = head_dim(llama_config(shape))
    kv = shape["num_key_value_heads"] * hd
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(1, i, device="cuda", dtype=torch.bfloat16)
    L = shape["num_hidden_layers"]
    mats = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i),
            "qkv": (h + 2 * kv, h), "gate_up": (2 * i, h), "lm_head": (shape["vocab_size"], h)}
    times = {}
    for name, (n, k) in mats.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]   # rotate: beat L2
        inp = xi if k == i else x
        state = {"j": 0}

        def call():
            state["j"] += 1
            return inp @ ws[state["j"] % 4].T
        times[name] = event_time(call, iters=40, graph=True)
    sep = L * sum(times[n] for n in ("q", "k", "v", "o", "gate", "up", "down")) + times["lm_head"]
    fused = L * (times["qkv"] + times["o"] + times["gate_up"] + times["down"]) + times["lm_head"]
    return {"separate_ms": sep * 1e3, "fused_ms": fused * 1e3, **{k + "_us": v * 1e6 for k, v in times.items()}}


def attention_precision() -> dict:
    """Triton kernel vs float64 reference on bf16 inputs, one causal prefill per length."""
    from engine.attention import paged_attention_reference
    from engine.kernels.paged_attention import paged_attention_triton
    from tests.test_gpu import _random_batch
    out = {}
    for n in (17, 100, 333, 1000):
        q, kc, vc, meta = _random_batch(4, 8, 64, 16, [n], [n], torch.bfloat16, seed=n)
        ref = paged_attention_reference(q.double(), kc.double(), vc.double(), meta, 0.125)
        ref16 = paged_attention_reference(q, kc, vc, meta, 0.125)
        tri = paged_attention_triton(q, kc, vc, meta, 0.125)
        rel = lambda a: float((a.double() - ref).norm() / ref.norm())
        out[n] = {"triton": rel(tri), "torch_sdpa_bf16": rel(ref16)}
    return out


def logits_check(reference_attention: bool = False) -> dict:
    import engine.attention as attention
    import engine.context as context
    if reference_attention:        # same model code, torch SDPA attention instead of Triton
        context.paged_attention = attention.paged_attention_reference
    engine = make_engine(LLAMA_1B, 4.0, enforce_eager=True)
    hf16 = hf_twin(engine)
    hf32 = hf_twin(engine).float()
    rng = random.Random(1)
    out = {"hf_bf16_inv_freq_dtype": str(hf16.model.rotary_emb.inv_freq.dtype)}
    for n in (17, 100, 333):
        p = [rng.randrange(100, 100000) for _ in range(n)]
        ours = _last_logits(engine, p)
        with torch.no_grad():
            r16 = hf16(torch.tensor([p], device="cuda")).logits[0, -1].float()
            r32 = hf32(torch.tensor([p], device="cuda")).logits[0, -1].float()
        rel = lambda a, b: float((a - b).norm() / b.norm())
        out[n] = {"ours_vs_hf_bf16": rel(ours, r16), "ours_vs_hf_fp32": rel(ours, r32), "hf_bf16_vs_fp32": rel(r16, r32)}
    context.paged_attention = attention.paged_attention
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "commit": git_commit(), "copy_GBps": copy_bandwidth() / 1e9}
    res["attention_precision"] = attention_precision()
    print(res, flush=True)
    res["logits_1b"] = logits_check()
    print(res["logits_1b"], flush=True)
    res["logits_1b_reference_attention"] = logits_check(reference_attention=True)
    print(res["logits_1b_reference_attention"], flush=True)

    torch.cuda.empty_cache()
    res["gemv_8b"] = gemv_floor(LLAMA_8B)
    print(res["gemv_8b"], flush=True)
    engine = make_engine(LLAMA_8B, kv_gib=8, cuda_graph_max_batch=8)
    res["step_8b_b1"] = step_breakdown(engine)
    emit(res, args.out, "gpu_decode_profile")


if __name__ == "__main__":
    main()
