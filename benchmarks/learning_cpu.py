"""The online loop in one process on the CPU (no HTTP): SmolLM2 serves batches of 8 built-in prompts,
the `concise` rater rates them, feedback goes through the real FeedbackStore, the OnlineTrainer trains
between batches by reuse; prints the rolling positive rate, then held-out perplexity with and without
the adapter. A quick way to compare learning settings; `alchemist simulate` is the end-to-end demo.

    python -m benchmarks.learning_cpu --lr 3e-4 --objective pg --temperature 1.0 --events 600 --seed 0
    (--prompt-lm-weight and --pg-clip default to TrainerConfig's defaults)
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import build_engine
from engine.config import EngineConfig
from engine.embedded_model import ensure_default_model
from engine.sampling_params import SamplingParams
from store.feedback_store import CompletionRecord, FeedbackStore
from trainer.config import TrainerConfig
from trainer.online import OnlineTrainer
from trainer.perplexity import largest_increases
from trainer.prompts import PROMPTS
from trainer.simulate import rate


def serve_and_rate(engine, store, rng, step: int, temperature: float, batch: int = 8, seed: int = 0) -> list[int]:
    tok = engine.tokenizer
    texts = [rng.choice(PROMPTS)[1] for _ in range(batch)]
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=False), add_special_tokens=False).input_ids for t in texts]
    seqs = [s[0] for s in engine.generate(ids, SamplingParams(temperature=temperature, max_tokens=64,
                                                                  seed=seed * 100_000 + step))]
    store.record_completions([CompletionRecord(s.request_id, 0, s.prompt_token_ids, s.output_token_ids,
                                               s.logprobs, engine.adapter_version, None, time.time()) for s in seqs])
    ratings = [rate(tok.decode(s.output_token_ids, skip_special_tokens=True)) for s in seqs]
    for s, r in zip(seqs, ratings):
        store.add_feedback(response_id=s.request_id, choice_index=0, rating=r)
    return ratings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--objective", default="pg")
    ap.add_argument("--events", type=int, default=240)
    ap.add_argument("--window", type=int, default=48)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--prompt-lm-weight", type=float, default=TrainerConfig.prompt_lm_weight)
    ap.add_argument("--seed", type=int, default=0, help="prompt order and sampling seeds")
    ap.add_argument("--pg-clip", type=float, default=TrainerConfig.pg_clip)
    ap.add_argument("--max-update-norm", type=float, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    engine = build_engine(EngineConfig(model=str(ensure_default_model())))
    store = FeedbackStore(tmp / "alchemist.db")
    config = TrainerConfig(lr=args.lr, objective=args.objective, checkpoint_every=1000, duty_cycle=1.0,
                           max_records_per_step=8, min_records_per_step=1,
                           lora_targets=args.targets.split(","), lora_rank=args.rank,
                           lora_alpha=2.0 * args.rank, weight_decay=args.weight_decay,
                           prompt_lm_weight=args.prompt_lm_weight, pg_clip=args.pg_clip,
                           max_update_norm=args.max_update_norm)
    trainer = OnlineTrainer(config, engine.training_port(), store, tmp / "run")
    rng, ratings, start = random.Random(args.seed), [], time.time()
    for step in range(args.events // 8):
        ratings += serve_and_rate(engine, store, rng, step, args.temperature, seed=args.seed)
        trainer.step()
        window = ratings[-args.window:]
        print(f"events {len(ratings)} rate {sum(r > 0 for r in window) / len(window):.2f} "
              f"version {trainer.version} t {time.time() - start:.0f}s {dict(trainer.totals)}", flush=True)
    adapters = trainer.adapters.training_adapters(trainer.masters)
    with torch.no_grad():
        held_out = largest_increases(engine.runner.model, engine.tokenizer, adapters)
    print(json.dumps(held_out), flush=True)
    base, adapted = held_out["base_ppl"], held_out["adapted_ppl"]
    first, last = ratings[:args.window], ratings[-args.window:]
    print(json.dumps({"lr": args.lr, "objective": args.objective, "targets": args.targets, "rank": args.rank,
                      "temperature": args.temperature, "weight_decay": args.weight_decay,
                      "prompt_lm_weight": args.prompt_lm_weight, "seed": args.seed, "pg_clip": args.pg_clip,
                      "max_update_norm": args.max_update_norm,
                      "events": len(ratings),
                      "initial_rate": sum(r > 0 for r in first) / len(first),
                      "final_rate": sum(r > 0 for r in last) / len(last), "base_ppl": base,
                      "adapted_ppl": adapted, "ppl_ratio": adapted / base, "totals": dict(trainer.totals),
                      "elapsed_s": time.time() - start}))


if __name__ == "__main__":
    main()
