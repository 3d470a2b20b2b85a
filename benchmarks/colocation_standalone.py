"""The co-location benchmark's standalone phase (benchmarks/gpu_colocation.py, issue 17): with no serving
traffic, the same records trained two ways in one run —

- `own_recompute`: `forward_backward` (recompute, no reuse) over the records in steps of at most
  `step_tokens`, on this thread, nothing else running (what `gpu_training`'s recompute mode measures,
  with the trainer's prompt LM term, so that both compute the same logits);
- `trainer`: the server's trainer (thread, latency budget, objective, optimizer, versions) training the
  same records, all rated at once; its rate is trained tokens over the time inside its steps, and the
  wall time until the last one is trained is reported beside it.

Both recompute: the records' captured rows are released before either runs, so the comparison is the
trainer's machinery (pacing, gates, bookkeeping) against the bare step, not reuse against recompute."""
from __future__ import annotations

import time
from collections import Counter

import torch

from benchmarks.colocation_loads import drain_backlog
from benchmarks.colocation_workload import params
from trainer.reuse import TrainRecord
from trainer.step import forward_backward


def batches(records: list[TrainRecord], step_tokens: int) -> list[list[TrainRecord]]:
    """Records in file order, packed greedily into steps of at most `step_tokens` (as the trainer takes)."""
    out, tokens = [[]], 0
    for record in records:
        size = len(record.prompt_ids) + len(record.response_ids)
        if out[-1] and tokens + size > step_tokens:
            out.append([])
            tokens = 0
        out[-1].append(record)
        tokens += size
    return out


def own_recompute(engine, trainer, records: list[TrainRecord], step_tokens: int, repeat: int = 2) -> dict:
    """Bare recompute steps over the records (the trainer paused); the best of `repeat` passes."""
    adapters = trainer.adapters.training_adapters(trainer.masters)
    tensors = [t for pair in trainer.masters.values() for t in pair]
    steps = batches(records, step_tokens)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in records)
    best = float("inf")
    for _ in range(repeat + 1):                  # the first pass warms up (allocator, kernels)
        sync(engine)
        t = time.perf_counter()
        for batch in steps:
            forward_backward(engine.runner.model, batch, adapters, reuse=False,
                             prompt_lm_weight=trainer.config.prompt_lm_weight,
                             prompt_lm_targets=trainer.prompt_lm_targets)
        sync(engine)
        best = min(best, time.perf_counter() - t)
        for tensor in tensors:
            tensor.grad = None
    return {"tokens": tokens, "steps": len(steps), "seconds": best, "tok_s": tokens / best}


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def standalone(args, engine, state, hooks, workload, writer) -> dict:
    trainer = state.trainer
    chosen = workload[-args.standalone_records:]                # not the first records the runs used
    seqs = [s[0] for s in engine.generate([p for p, _ in chosen], [params(m) for _, m in chosen])]
    for seq in seqs:                                            # both ways recompute
        engine.activation_pool.release(seq.record_key)
    records = [TrainRecord(s.record_key, list(s.prompt_token_ids), list(s.output_token_ids), list(s.logprobs))
               for s in seqs]
    trainer.pause()
    with trainer.lock:                                          # no step of the trainer under way
        bare = own_recompute(engine, trainer, records, args.step_tokens)
    before = Counter(trainer.totals)
    for seq in seqs:
        writer.finished(seq, 1)
    writer.drain()
    t = time.perf_counter()
    trainer.resume()
    drain_backlog(state, hooks, timeout=600)                    # until the last step has ended
    wall = time.perf_counter() - t
    done = Counter(trainer.totals) - before
    trained = done["tokens_reuse"] + done["tokens_recompute"]
    inside = done["seconds"]
    return {"records": len(records), "own_recompute_tok_s": bare["tok_s"], "own_recompute": bare,
            "trainer_tok_s": trained / inside if inside else 0.0, "trainer_tokens": trained,
            "trainer_steps": done["steps"], "trainer_seconds_in_steps": inside, "trainer_wall_s": wall,
            "trainer_cpu_s_per_step": done["cpu_seconds"] / max(done["steps"], 1),
            "trainer_vs_own_recompute": (trained / inside) / bare["tok_s"] if inside else 0.0,
            "train_error": state.train_error}
