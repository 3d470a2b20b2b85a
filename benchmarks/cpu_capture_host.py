"""Host cost of `prefill` capture in one prompt step, on the CPU: a 32-layer Llama with tiny widths (so
the step is nearly all Python and dispatch, as a host-bound GPU prefill is), projections packed per
group as on CUDA, one thread. Three engines side by side — capture `none`, `prefill`, and a second
`none` (the A/A control) — each serving the same prompts in turn; the median step of each and the
ratios to `none` (JSON).

    python -m benchmarks.cpu_capture_host [--prompt-len 16] [--prompts 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import build_engine, emit, git_commit, llama_config
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.packing import pack_model
from engine.sampling_params import SamplingParams

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, rms_norm_eps=1e-5)
MODES = {"none": "none", "prefill": "prefill", "none:control": "none"}


def engine_for(capture: str) -> LLMEngine:
    cfg = EngineConfig(load_format="random", device="cpu", dtype="float32", num_kv_blocks=1024, seed=0,
                       capture=capture, activation_pool_bytes=256 << 20)
    engine = build_engine(cfg, llama_config(SHAPE))
    pack_model(engine.runner.model)
    if engine.activation_pool is not None:      # touch the pool's pages: a first write would page-fault
        for rows in engine.activation_pool.direct_buffers.values():   # (the CPU's cost, not the GPU's)
            rows.zero_()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    engines = {mode: engine_for(capture) for mode, capture in MODES.items()}
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    times: dict[str, list[float]] = {mode: [] for mode in engines}
    for i in range(args.prompts):
        prompt = [(i * 7 + j) % SHAPE["vocab_size"] for j in range(args.prompt_len)]
        for mode, engine in engines.items():
            engine.add_request(f"r{i}", prompt, params, 0)
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            times[mode].append(time.perf_counter() - start)
    warm = args.prompts // 10
    median_ms = {mode: statistics.median(t[warm:]) * 1e3 for mode, t in times.items()}
    emit({"commit": git_commit(), "prompt_len": args.prompt_len, "layers": SHAPE["num_hidden_layers"],
          "median_step_ms": median_ms,
          "vs_none": {mode: ms / median_ms["none"] for mode, ms in median_ms.items()},
          "capture_steps": engines["prefill"].capture.steps}, args.out, "cpu_capture_host")


if __name__ == "__main__":
    main()
