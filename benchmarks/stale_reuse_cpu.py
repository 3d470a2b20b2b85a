"""How far stale reuse is from recompute when the adapter moved by *real* optimizer steps (issue 17), on
the CPU: records are served (with capture) by adapter version v; then the adapter takes k AdamW steps
on other served records (the trainer's learning rate and gradient clip, from PEFT's zero-B start
plus a few warm-up steps), each published as the next version; then the first records' LoRA gradient is taken by reuse of their stale rows (rows of version
v, trained against v + k) and by recompute, and compared. `alchemist check-grad --staleness` moves the
adapter at random instead; this is what `training.max_staleness` trades in practice.

    python -m benchmarks.stale_reuse_cpu --model smollm2 --max-staleness 4 --out DIR
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import emit, git_commit
from trainer.adapters import AdapterManager
from trainer.check_grad import build_engine, compare, serve_records, train_once
from trainer.config import TrainerConfig
from trainer.lora import LoRAConfig
from trainer.step import forward_backward


def optimizer_step(engine, manager, masters, optimizer, records, max_grad_norm: float) -> None:
    """One AdamW step on `records` (recompute, NLL), published as the next version and made live."""
    params = [t for pair in masters.values() for t in pair]
    optimizer.zero_grad(set_to_none=True)
    forward_backward(engine.runner.model, records, manager.training_adapters(masters), reuse=False)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    for record in records:                      # trained: released, as the trainer does (ids are reused)
        engine.activation_pool.release(record.key)
    engine.offer_adapter(manager.stage(masters, engine.adapter_version + 1))
    engine.apply_adapter_offer()


def one_staleness(model: str, capture: str, staleness: int, seed: int, lr: float, warm_steps: int) -> dict:
    """The adapter starts as PEFT's does (B = 0) and takes `warm_steps` real steps before the records are
    served (so it is not at its zero point), then `staleness` more before they are trained."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    engine = build_engine(model, capture, seed)
    manager = AdapterManager(engine.runner.model, LoRAConfig(rank=TrainerConfig.lora_rank,
                                                             alpha=TrainerConfig.lora_alpha), generator=gen)
    masters = manager.masters(0)
    optimizer = torch.optim.AdamW([t for pair in masters.values() for t in pair], lr=lr)
    for k in range(warm_steps):
        optimizer_step(engine, manager, masters, optimizer, serve_records(engine, seed + 50 + k, tag=f"warm{k}"),
                       TrainerConfig.max_grad_norm)
    records = serve_records(engine, seed)                        # captured at version v
    for k in range(staleness):                                   # real steps on other records
        optimizer_step(engine, manager, masters, optimizer, serve_records(engine, seed + 100 + k, tag=f"step{k}"),
                       TrainerConfig.max_grad_norm)
    for pair in masters.values():
        for t in pair:
            t.grad = None
    reuse, g_reuse = train_once(engine, manager, records, True, max_staleness=staleness)
    recompute, g_recompute = train_once(engine, manager, records, False, max_staleness=staleness)
    return {"staleness": staleness, **compare(g_reuse, g_recompute), "outcomes": dict(reuse.outcomes),
            "reused_rows": reuse.reused_rows, "loss_reuse": reuse.loss, "loss_recompute": recompute.loss}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=("tiny-llama", "tiny-qwen2", "smollm2"))
    ap.add_argument("--capture", default="prefill", choices=("prefill", "prefill+decode"))
    ap.add_argument("--max-staleness", type=int, default=4)
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    ap.add_argument("--lr", type=float, default=TrainerConfig.lr)
    ap.add_argument("--warm-steps", type=int, default=4, help="real steps before the records are served")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    runs = [one_staleness(args.model, args.capture, k, seed, args.lr, args.warm_steps)
            for k in range(args.max_staleness + 1) for seed in args.seeds]
    by_k = {}
    for run in runs:
        by_k.setdefault(str(run["staleness"]), []).append(run["cosine"])
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "device": "cpu", "args": vars(args),
           "runs": runs, "cosine_by_staleness": {k: {"min": min(v), "mean": sum(v) / len(v)} for k, v in by_k.items()},
           "seconds": time.perf_counter() - t}
    emit(res, args.out, "stale_reuse_cpu")
    return res


if __name__ == "__main__":
    main()
