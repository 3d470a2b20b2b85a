"""SmolLM2-135M-Instruct on the CPU (fp32): decode tok/s at batch 1 and 8, ours vs HF `generate`,
side by side in one run (issue 2). `make bench-cpu` or `python -m benchmarks.cpu_decode`."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import build_engine, emit, git_commit
from engine.config import EngineConfig
from engine.embedded_model import ensure_default_model
from engine.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def wall(fn, repeat: int) -> float:
    fn()                                                  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    model_dir = str(ensure_default_model())
    engine = build_engine(EngineConfig(model=model_dir))
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = args.new_tokens
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "prompt_tokens": len(prompt), "new_tokens": n}
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for batch in (1, 8):
        ours = wall(lambda: engine.generate([prompt] * batch, params), args.repeat)
        ids = torch.tensor([prompt] * batch)

        def hf_run():
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        theirs = wall(hf_run, args.repeat)
        res[f"batch{batch}"] = {"ours_tok_s": batch * n / ours, "hf_generate_tok_s": batch * n / theirs,
                                "ratio": theirs / ours}
        print(batch, res[f"batch{batch}"], flush=True)
    emit(res, args.out, "cpu_decode")


if __name__ == "__main__":
    main()
