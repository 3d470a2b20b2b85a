"""Serving on one GPU, side by side in one run (DESIGN §6, issue 2):
decode step at batch 1 vs weight bytes / measured copy bandwidth; our engine vs transformers'
`generate` and `generate_batch` on 64 x (512 + 128) and on a ShareGPT mix; logits vs HF (1B shape).

    python -m benchmarks.gpu_serving --out OUT_DIR [--sharegpt .bench/sharegpt.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from benchmarks.common import (LLAMA_1B, LLAMA_8B, build_engine, copy_bandwidth, emit, git_commit, llama_config,
                               matmul_tflops, timed)
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_engine(shape: dict, kv_gib: float, **overrides) -> LLMEngine:
    options = dict(load_format="random", device=DEVICE, kv_cache_bytes=int(kv_gib * (1 << 30)),
                   max_num_seqs=256, max_num_batched_tokens=8192, cuda_graph_max_batch=128)
    cfg = EngineConfig(**{**options, **overrides})
    return build_engine(cfg, llama_config(shape))


def hf_twin(engine: LLMEngine):
    """An HF LlamaForCausalLM with the engine's weights (same names), bf16 on the GPU."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    with torch.device(DEVICE):
        hf = LlamaForCausalLM(engine.hf_config).to(engine.runner.dtype)
        # .to() rounded the fp32 RoPE inverse frequencies; from_pretrained(dtype=...) keeps them fp32
        hf.model.rotary_emb = LlamaRotaryEmbedding(engine.hf_config)
    missing, unexpected = hf.load_state_dict(engine.runner.model.state_dict(), strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"weight names differ: {missing[:3]} {unexpected[:3]}")
    return hf.eval()


def decode_step_batch1(engine: LLMEngine, prompt_len: int = 512, steps: int = 128) -> float:
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    engine.add_request("b1", [random.randrange(engine.hf_config.vocab_size) for _ in range(prompt_len)], params)
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()                      # each step ends with its one host sync
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:])    # decode steps after the prefill and warm-up


def ours_throughput(engine, prompts, out_lens, repeat):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False) for n in out_lens]
    secs, reqs = timed(lambda: engine.generate(prompts, params), warmup=1, repeat=repeat)
    produced = sum(len(r[0].output_token_ids) for r in reqs)
    return produced / secs, secs, produced


def hf_generate_throughput(hf, prompts, out_lens, repeat, batch: int = 64):
    """HF generate in batches of `batch` (left-padded); useful tokens = the workload's output lengths."""
    def run():
        for i in range(0, len(prompts), batch):
            chunk, lens = prompts[i:i + batch], out_lens[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=DEVICE)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=DEVICE)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                        do_sample=False, pad_token_id=0)
    secs, _ = timed(run, warmup=1, repeat=repeat)
    return sum(out_lens) / secs, secs


def hf_generate_batch_throughput(hf, prompts, out_lens, repeat):
    from transformers import GenerationConfig
    gen = GenerationConfig(max_new_tokens=max(out_lens), min_new_tokens=max(out_lens), do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    secs, out = timed(lambda: hf.generate_batch(prompts, generation_config=gen), warmup=1, repeat=repeat)
    produced = sum(len(o.generated_tokens) for o in out.values())
    return produced / secs, secs, produced


def logits_vs_hf(kv_gib: float = 4.0) -> dict:
    """Relative L2 error of the last-position logits, three ways: ours (bf16) vs HF (bf16), and
    each of them vs HF in fp32 with the same weights, which tells bf16 rounding noise from a defect."""
    engine = make_engine(LLAMA_1B, kv_gib)
    hf = hf_twin(engine)
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 100000) for _ in range(n)] for n in (17, 100, 333)]
    ours = [_last_logits(engine, p) for p in prompts]
    with torch.no_grad():
        hf_bf16 = [hf(torch.tensor([p], device=DEVICE)).logits[0, -1].float() for p in prompts]
        hf.float()                                   # bf16 weights are exact in fp32
        hf_fp32 = [hf(torch.tensor([p], device=DEVICE)).logits[0, -1].float() for p in prompts]
    rel = lambda a, b: max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))
    del hf
    return {"ours_bf16_vs_hf_bf16": rel(ours, hf_bf16), "ours_bf16_vs_hf_fp32": rel(ours, hf_fp32),
            "hf_bf16_vs_hf_fp32": rel(hf_bf16, hf_fp32), "prompt_lens": [len(p) for p in prompts]}


def _last_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Prefill `prompt` through the paged path and return the last position's logits."""
    captured = {}
    model = engine.runner.model
    original = model.compute_logits
    model.compute_logits = lambda h: captured.setdefault("l", original(h))
    try:
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, detokenize=False))
    finally:
        model.compute_logits = original
    return captured["l"][-1].float()


def stage(res: dict, name: str, fn) -> None:
    """Run one measurement; a failure is recorded and the run goes on."""
    import traceback
    try:
        res[name] = fn()
    except Exception as err:           # a benchmark stage must not hide the others
        traceback.print_exc()
        res[name] = {"error": repr(err)}
    print(name, json.dumps(res[name]), flush=True)


def decode_b1_entry(engine: LLMEngine, copy_bps: float) -> dict:
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    floor = weight_bytes / copy_bps
    step = decode_step_batch1(engine)
    return {"step_ms": step * 1e3, "floor_ms": floor * 1e3, "ratio": step / floor, "weight_GB": weight_bytes / 1e9}


def throughput_entry(engine, hf, prompts, outs, args) -> dict:
    tps, secs, produced = ours_throughput(engine, prompts, outs, args.repeat)
    entry = {"ours_tok_s": tps, "ours_s": secs, "out_tokens": produced, "prompt_tokens": sum(map(len, prompts))}
    print(json.dumps(entry), flush=True)
    entry["hf_generate_tok_s"], entry["hf_generate_s"] = hf_generate_throughput(hf, prompts, outs, args.hf_repeat)
    entry["speedup_vs_generate"] = tps / entry["hf_generate_tok_s"]
    print(json.dumps(entry), flush=True)
    gb, gb_s, gb_n = hf_generate_batch_throughput(hf, prompts, outs, args.hf_repeat)
    entry.update(hf_generate_batch_tok_s=gb, hf_generate_batch_s=gb_s, hf_generate_batch_tokens=gb_n,
                 speedup_vs_generate_batch=tps / gb)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sharegpt", default=".bench/sharegpt.json")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--hf-repeat", type=int, default=5)
    ap.add_argument("--sharegpt-num", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="only the decode step and our own throughput")
    ap.add_argument("--stages", default="logits,decode,fixed,sharegpt",
                    help="comma-separated subset of logits,decode,fixed,sharegpt (to split a long run)")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    import transformers
    res = {"gpu": torch.cuda.get_device_name(), "commit": git_commit(), "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "copy_GBps": copy_bandwidth() / 1e9, "matmul_TFLOPs": matmul_tflops()}
    print(f"ceilings: copy {res['copy_GBps']:.0f} GB/s, matmul {res['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    if not args.quick and "logits" in stages:
        stage(res, "logits_rel_err_1b_bf16", logits_vs_hf)
        torch.cuda.empty_cache()
    t = time.perf_counter()
    engine = make_engine(LLAMA_8B, kv_gib=24)
    print(f"8B engine ready in {time.perf_counter() - t:.1f} s (weights, compile, CUDA graphs)", flush=True)
    if args.quick or "decode" in stages:
        stage(res, "decode_b1", lambda: decode_b1_entry(engine, res["copy_GBps"] * 1e9))
    rng = random.Random(0)
    fixed = [[rng.randrange(1000, 100000) for _ in range(512)] for _ in range(64)]
    if args.quick:
        stage(res, "fixed_64x512+128_ours_only", lambda: dict(zip(
            ("ours_tok_s", "ours_s", "out_tokens"), ours_throughput(engine, fixed, [128] * 64, args.repeat))))
        emit(res, args.out, "gpu_serving_quick")
        return
    records = json.load(open(args.sharegpt))[:args.sharegpt_num]
    sg_prompts = [r["prompt"][-1024:] for r in records]
    sg_out = [min(len(r["response"]), 256) for r in records]
    hf = hf_twin(engine)
    if "fixed" in stages:
        stage(res, "fixed_64x512+128", lambda: throughput_entry(engine, hf, fixed, [128] * 64, args))
    if "sharegpt" in stages:
        stage(res, "sharegpt", lambda: throughput_entry(engine, hf, sg_prompts, sg_out, args))
    emit(res, args.out, "gpu_serving_" + args.stages.replace(",", "_"))


if __name__ == "__main__":
    main()
