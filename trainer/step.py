"""One training step over a batch of served records: plan reuse vs recompute per record, inject
captured rows, run the shared model forward with a TrainingContext, take the loss, backward."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.context import to_device
from store.pool_reader import BatchRows, Span
from trainer.attention import disable_varlen
from trainer.buckets import padding_for
from trainer.reuse import Injection, TrainingContext, TrainRecord
from trainer.user_text import all_prompt_positions

# outcome of a record's activations: reused exactly, reused though the adapter moved (within
# max_staleness), or recomputed because they were evicted / never captured / too stale
HIT, STALE, EVICTED, TOO_STALE = "hit", "stale", "evicted", "too_stale"


@dataclass
class RecordPlan:
    outcome: str
    rows: int              # input positions [first, first + rows) come from the pool
    staleness: int = 0
    first: int = 0         # the pool record's offset (positions before it came from a prefix cache)


@dataclass
class StepResult:
    loss: float
    outcomes: Counter = field(default_factory=Counter)
    reused_rows: int = 0
    computed_rows: int = 0
    response_tokens: int = 0
    tokens_by_path: Counter = field(default_factory=Counter)   # reuse | recompute: tokens trained each way
    # "device/q", "cpu/q", "recomputed/q": rows of captured records per source and kind, summed over layers
    pool_rows: Counter = field(default_factory=Counter)
    fetch_plan: dict = field(default_factory=dict)     # the fetch planner's summary (trainer/fetch_planner.py)


def plan_record(record: TrainRecord, pool, trainer_version: int, max_staleness: int) -> RecordPlan:
    """Reuse or recompute one record: its captured rows are reused wherever some kind of them is still
    held (device or host tier; store/pool_reader.py injects kind by kind what is where)."""
    entry = pool.get(record.key) if pool is not None else None
    if entry is None or entry.tier == "dropped" or entry.captured == 0:
        return RecordPlan(EVICTED, 0)
    rows = min(entry.captured, record.num_inputs - entry.offset)
    if rows <= 0:
        return RecordPlan(EVICTED, 0)
    staleness = max(trainer_version - min(entry.versions[:rows]), max(entry.versions[:rows]) - trainer_version)
    if staleness == 0:
        return RecordPlan(HIT, rows, 0, entry.offset)
    if staleness <= max_staleness:
        return RecordPlan(STALE, rows, staleness, entry.offset)
    return RecordPlan(TOO_STALE, 0, staleness)


def build_injection(records: list[TrainRecord], plans: list[RecordPlan], pool, device: torch.device,
                    padding: int = 0, uniform: bool = False,
                    planner=None) -> tuple[Injection | None, BatchRows | None]:
    """The step's injection over a BatchRows reader of the planned records' pool rows (every tier), and
    the reader (its row counts). `uniform` (the compiled layer): a record's rows are injected only where
    every layer and kind of it is held. `planner` (trainer.fetch_planner.FetchPlanner): which host rows
    to fetch this step; the rest are multiplied."""
    spans, offset = [], 0
    for record, plan in zip(records, plans):
        if plan.rows:
            spans.append(Span(record.key, plan.rows, offset + plan.first))
        offset += record.num_inputs
    if not spans:
        return None, None
    reader = BatchRows(pool, spans, offset + padding, device, uniform)   # the padding rows are multiplied
    units = reader.host_units()
    if planner is not None and units:
        fetch_plan = planner.plan(units, pool.layout, offset + padding)
        reader.plan_recompute(fetch_plan.recompute)
        reader.plan_summary = fetch_plan.summary
    select = None if uniform else reader.select
    return Injection(reader.stored_idx, reader.fresh_idx, reader.rows, select), reader


def probe_records(vocab_size: int) -> list[TrainRecord]:
    """One 12-token record (8 prompt + 4 response tokens, nothing captured): warm_up's step, and the
    trainer's probe of whether it can train at all (trainer/isolation.py)."""
    ids = [i % vocab_size for i in range(1, 13)]
    return [TrainRecord(None, ids[:8], ids[8:], [0.0] * 4)]


def warm_up(model, adapters: dict, vocab_size: int, device: torch.device, pool=None, compiled=None) -> None:
    """Tiny training steps (forward and backward, 12 tokens) so the training graphs are compiled now,
    before serving: compiling them at the first real step would hold the interpreter for seconds (the
    compiled layer: minutes) while the engine serves. A recompute step compiles the fused ops (CUDA);
    with `compiled` (trainer.compiled_layer.CompiledLayers) and a `pool`, two injected steps compile the
    layer graphs of a batch with multiplied rows beside injected ones (prefill capture) and of one with
    every row injected (prefill+decode). Leaves gradients on the adapters' tensors: the caller clears them."""
    if device.type != "cuda" and compiled is None:    # fused ops are compiled on CUDA only (engine/layers.py)
        return
    records = probe_records(vocab_size)
    ids = records[0].prompt_ids + records[0].response_ids
    try:
        forward_backward(model, records, adapters, reuse=False, compiled=compiled)
    except (RuntimeError, NotImplementedError) as err:     # varlen attention's backward, say: do without it
        if not disable_varlen(err):
            raise
        forward_backward(model, records, adapters, reuse=False, compiled=compiled)
    if compiled is not None and pool is not None:
        _warm_up_injected(model, adapters, pool, compiled, ids)


def _warm_up_injected(model, adapters: dict, pool, compiled, ids: list[int]) -> None:
    """The injected steps of warm_up, over a scratch pool record (its rows are whatever the pool holds:
    only the graphs matter) released afterwards."""
    key = ("alchemist-warm-up", 0)
    stored = TrainRecord(key, ids[:8], ids[8:], [0.0] * 4)
    if pool.reserve(key, stored.num_inputs) is None:
        return
    try:
        pool.mark_captured(key, stored.num_inputs, 0)
        pool.pin(key)
        multiplied = TrainRecord(None, ids[:5], ids[5:9], [0.0] * 4)      # nothing captured: recomputed rows
        for records in ([stored, multiplied], [stored]):
            forward_backward(model, records, adapters, pool=pool, reuse=True, compiled=compiled)
    finally:
        pool.release(key)


def ints_to_device(device: torch.device, *lists: list[int]) -> list[torch.Tensor]:
    """The int lists as int64 tensors on `device` in one copy (engine.context.to_device: pinned, no wait
    for the device; a step's only host syncs are at its end, reading the loss and grad norm)."""
    flat = to_device([v for values in lists for v in values], torch.long, device)
    return list(flat.split([len(values) for values in lists]))


def nll_loss(logprobs: list[torch.Tensor], records: list[TrainRecord]) -> torch.Tensor:
    """Mean negative log-likelihood over all response tokens (the check-grad objective)."""
    return -torch.cat(logprobs).mean()


def forward_backward(model, records: list[TrainRecord], adapters: dict, *, pool=None, reuse: bool = True,
                     trainer_version: int = 0, max_staleness: int = 0, checkpoint_layers: bool = False,
                     loss_fn: Callable = nll_loss, prompt_lm_weight: float = 0.0,
                     prompt_lm_targets: Callable[[list[int]], list[int]] | None = None,
                     between_layers: Callable[[], None] | None = None, attention: str = "auto",
                     compiled=None, buckets: list[int] | None = None, fetch_planner=None) -> StepResult:
    """adapters: {module: (A, B, scaling)} with A, B fp32 leaf tensors that receive .grad.

    prompt_lm_weight > 0 adds that weight times the mean NLL of the prompt tokens that are the users'
    own text (whose rows the forward covers anyway: a language-model anchor with no extra forward, like
    InstructGPT's PPO-ptx mixing in pretraining data). `prompt_lm_targets(prompt_ids)` gives their
    indices (trainer.user_text.prompt_lm_positions(tokenizer): the user messages of the chat template;
    default: every prompt token). `attention`: trainer.attention's kind (auto = one varlen flash call
    per layer where torch and the inputs allow it, else SDPA per record). `compiled`: a
    trainer.compiled_layer.CompiledLayers to run each layer as one compiled graph (None: eager).
    `buckets`: pad the batch to the smallest of these token counts that holds it (trainer/buckets.py).
    `fetch_planner`: a trainer.fetch_planner.FetchPlanner choosing which host-tier rows to copy in
    (None: every one)."""
    device = next(model.parameters()).device
    prompt_lm_targets = prompt_lm_targets or all_prompt_positions
    plans = [plan_record(r, pool if reuse else None, trainer_version, max_staleness) for r in records]
    padding = padding_for(sum(r.num_inputs for r in records), buckets)
    injection, reader = build_injection(records, plans, pool, device, padding, compiled is not None,
                                        fetch_planner) if reuse else (None, None)
    cu, ids, positions, logit_rows, targets = [0], [], [], [], []
    prompt_rows, prompt_targets = [], []
    for r in records:
        ids += r.input_ids
        positions += range(r.num_inputs)
        logit_rows += range(cu[-1] + len(r.prompt_ids) - 1, cu[-1] + r.num_inputs)   # rows predicting the response
        targets += r.response_ids
        if prompt_lm_weight > 0:
            where = prompt_lm_targets(r.prompt_ids)                              # prompt indices >= 1
            prompt_rows += [cu[-1] + j - 1 for j in where]                       # the rows predicting them
            prompt_targets += [r.prompt_ids[j] for j in where]
        cu.append(cu[-1] + r.num_inputs)
    real_rows = cu[-1]
    if padding:                     # one more sequence: attends to itself only, no logit row, no loss
        ids += [0] * padding
        positions += [0] * padding
        cu.append(cu[-1] + padding)
    ctx = TrainingContext(cu, adapters, injection, checkpoint_layers, between_layers, attention, compiled)
    ids_t, positions_t, rows, all_targets = ints_to_device(device, ids, positions, logit_rows + prompt_rows,
                                                           targets + prompt_targets)
    with torch.enable_grad():
        hidden = model(ids_t, positions_t, ctx)                                                      # [T, h]
        logits = model.compute_logits(hidden[rows]).float()                                         # [N, V]
        logp_all = logits.log_softmax(-1).gather(1, all_targets[:, None]).squeeze(1)                 # [N]
        response_logp, prompt_logp = logp_all.split([len(logit_rows), len(prompt_rows)])
        logprobs = list(response_logp.split([len(r.response_ids) for r in records]))
        loss = loss_fn(logprobs, records)
        if prompt_rows:
            loss = loss - prompt_lm_weight * prompt_logp.mean()
        loss.backward()
    reused = sum(p.rows for p in plans)
    paths = Counter()
    for r, p in zip(records, plans):
        paths["reuse" if p.rows else "recompute"] += len(r.prompt_ids) + len(r.response_ids)
    return StepResult(float(loss.detach()), Counter(p.outcome for p in plans), reused,
                      real_rows - reused, len(logit_rows), paths,
                      reader.counts if reader is not None else Counter(),
                      reader.plan_summary if reader is not None else {})
