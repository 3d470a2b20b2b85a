"""`alchemist check-grad`: serve a batch through the engine (continuous batching, chunked prefill,
activation capture), train one step by reuse and one by recompute, and compare (DESIGN §2).
`--tier cpu` moves every captured row to the pool's host tier before training, `--demote KINDS` drops
those kinds' rows (they are multiplied): reuse from every tier, and of what is left, stays exact."""
from __future__ import annotations

import argparse
import json
import random

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.setup import build_activation_pool, build_engine_parts
from store.pool_layout import KINDS
from trainer.adapters import AdapterManager
from trainer.lora import LoRAConfig
from trainer.reuse import TrainRecord
from trainer.step import forward_backward

MODELS = ("tiny-llama", "tiny-qwen2", "smollm2")


def tiny_hf_config(name: str):
    from transformers import LlamaConfig, Qwen2Config
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512,
                  max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    if name == "tiny-llama":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **common)
    return Qwen2Config(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, **common)


def build_engine(model: str, capture: str, seed: int, dtype: str = "float32",
                 pool_bytes: int = 256 << 20, cpu_pool_bytes: int = 0) -> LLMEngine:
    options = dict(capture=capture, device="cpu", dtype=dtype, max_num_batched_tokens=24, seed=seed,
                   num_kv_blocks=512, block_size=8, activation_pool_bytes=pool_bytes,
                   activation_pool_cpu_bytes=cpu_pool_bytes)
    if model == "smollm2":
        from engine.embedded_model import ensure_default_model
        config = EngineConfig(model=str(ensure_default_model()), **options)
        parts = build_engine_parts(config)
    else:
        config = EngineConfig(load_format="random", **options)
        parts = build_engine_parts(config, hf_config=tiny_hf_config(model))
    return LLMEngine(config, parts, build_activation_pool(config, parts))


def perturb(engine: LLMEngine, manager: AdapterManager, gen: torch.Generator) -> None:
    """Serve a new random adapter version, the next after the live one (B non-zero, so every LoRA factor
    gets a gradient)."""
    masters = manager.masters(engine.adapter_version)
    with torch.no_grad():
        for a, b in masters.values():
            a.add_(torch.randn(a.shape, generator=gen).to(a.device) * 0.05)
            b.add_(torch.randn(b.shape, generator=gen).to(b.device) * 0.05)
    engine.offer_adapter(manager.stage(masters, engine.adapter_version + 1))
    engine.apply_adapter_offer()                   # a step boundary: live now


def serve_records(engine: LLMEngine, seed: int, num: int = 6, shared_prefix: int = 0,
                  tag: str = "check") -> list[TrainRecord]:
    """Prompts of different lengths, half admitted while the first half decodes; with
    `shared_prefix` tokens in common (a system prompt), later requests hit the prefix cache."""
    rng = random.Random(seed)
    vocab = engine.hf_config.vocab_size
    prefix = [rng.randrange(3, min(vocab, 20000)) for _ in range(shared_prefix)]
    prompts = [prefix + [rng.randrange(3, min(vocab, 20000)) for _ in range(rng.randrange(5, 40))]
               for _ in range(num)]
    seqs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=1.0, seed=seed + i, max_tokens=rng.randrange(3, 12), ignore_eos=True)
        seqs += engine.add_request(f"{tag}-{i}", prompt, params)
        if i == num // 2 - 1:
            for _ in range(3):
                engine.step()
    while engine.has_unfinished():
        engine.step()
    return [TrainRecord(s.record_key, s.prompt_token_ids, s.output_token_ids, s.logprobs) for s in seqs]


def compare(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor]) -> dict:
    """max_rel_err: worst LoRA tensor's |ga - gb| / |gb|; rel_err: the same over all of them."""
    worst = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads_a, grads_b))
    flat_a = torch.cat([g.flatten() for g in grads_a]).double()
    flat_b = torch.cat([g.flatten() for g in grads_b]).double()
    return {"max_rel_err": worst, "rel_err": float((flat_a - flat_b).norm() / flat_b.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))}


def adapted_engine(model: str, capture: str, seed: int, gen: torch.Generator, dtype: str = "float32",
                   pool_bytes: int = 256 << 20, lora: LoRAConfig | None = None, cpu_pool_bytes: int = 0):
    """(engine, adapter manager) with LoRA on the engine's model, perturbed away from zero (version 1)
    and live in the engine."""
    engine = build_engine(model, capture, seed, dtype, pool_bytes, cpu_pool_bytes)
    manager = AdapterManager(engine.runner.model, lora or LoRAConfig(rank=4, alpha=8), generator=gen)
    perturb(engine, manager, gen)
    return engine, manager


def train_once(engine, manager, records, reuse: bool, max_staleness: int, checkpoint_layers: bool = False,
               compiled=None):
    """Gradients against the live adapter version (the trainer's masters = what serves now)."""
    masters = manager.masters(engine.adapter_version)
    adapters = manager.training_adapters(masters)
    result = forward_backward(engine.runner.model, records, adapters, pool=engine.activation_pool, reuse=reuse,
                              trainer_version=engine.adapter_version, max_staleness=max_staleness,
                              checkpoint_layers=checkpoint_layers, compiled=compiled)
    return result, [t.grad for pair in masters.values() for t in pair]


def move_tiers(pool, records: list[TrainRecord], tier: str, demote: tuple[str, ...]) -> None:
    """Every captured record's rows to `tier` ("device": left where they are, "cpu": the host tier),
    then its rows of `demote` dropped."""
    for key in {r.key for r in records if r.key is not None and pool.get(r.key) is not None}:
        if tier == "cpu":
            pool.demote(key, tuple(pool.layout.dims), "cpu")
        if demote:
            pool.demote(key, demote, "dropped")


def run_check(model: str = "tiny-llama", capture: str = "prefill", staleness: int = 0, seed: int = 0,
              max_staleness: int | None = None, dtype: str = "float32", pool_bytes: int = 256 << 20,
              shared_prefix: int = 0, tier: str = "device", demote: tuple[str, ...] = ()) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    engine, manager = adapted_engine(model, capture, seed, gen, dtype, pool_bytes,
                                     cpu_pool_bytes=pool_bytes if tier == "cpu" else 0)
    records = serve_records(engine, seed, shared_prefix=shared_prefix)
    move_tiers(engine.activation_pool, records, tier, tuple(demote))
    for k in range(staleness):                     # the adapter moves on after serving
        perturb(engine, manager, gen)
    max_staleness = staleness if max_staleness is None else max_staleness
    reuse, g_reuse = train_once(engine, manager, records, True, max_staleness)
    recompute, g_recompute = train_once(engine, manager, records, False, max_staleness)
    return {"model": model, "capture": capture, "dtype": dtype, "staleness": staleness,
            "loss_reuse": reuse.loss, "loss_recompute": recompute.loss, **compare(g_reuse, g_recompute),
            "outcomes": dict(reuse.outcomes), "reused_rows": reuse.reused_rows,
            "computed_rows": reuse.computed_rows, "records": len(records), "tier": tier,
            "demoted": list(demote), "pool_rows": dict(reuse.pool_rows), "pool": engine.activation_pool.stats()}


def add_parser(sub) -> None:
    p = sub.add_parser("check-grad", help="reuse vs recompute gradients on a served batch (one JSON line)")
    p.add_argument("--model", choices=MODELS, default="tiny-llama")
    p.add_argument("--capture", choices=("prefill", "prefill+decode"), default="prefill")
    p.add_argument("--staleness", type=int, default=0, help="adapter versions published after serving")
    p.add_argument("--max-staleness", type=int, default=None, help="default: --staleness (reuse stale rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tier", choices=("device", "cpu"), default="device",
                   help="cpu: move every captured row to the pool's host tier before training")
    p.add_argument("--demote", type=demote_kinds, default=(), metavar="KINDS",
                   help="comma-separated kinds whose captured rows are dropped before training, e.g. gate,up")


def demote_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind for kind in text.split(",") if kind)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown}: use some of {','.join(KINDS)}")
    return kinds


def main(args) -> int:
    print(json.dumps(run_check(args.model, args.capture, args.staleness, args.seed, args.max_staleness,
                                args.dtype, tier=args.tier, demote=args.demote)))
    return 0
