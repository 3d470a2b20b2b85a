"""Prometheus metrics of the online trainer, on the server's registry (label `model_name`).

Counters and gauges are read from the trainer at scrape time (a custom collector); the per-step
duration is a real histogram observed on the engine thread by `ServerState`. With training off
the same names are exported with zero values (adapter_version 0), so dashboards need no special case;
the backlog gauges then count every pending rating (nothing takes them).

Keep-up (issue 17): the backlog past the trainer's watermark and trained tokens/s come from the
trainer's `keep_up` (trainer/keep_up.py: one SQL query a scrape).
"""
from __future__ import annotations

import math

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily

from server.metric_families import counter as _counter, gauge as _gauge
from server.pool_metrics import pool_families
from trainer.isolation import QUARANTINE_REASONS
from trainer.keep_up import KeepUp

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_PATHS = ("reuse", "recompute")
REUSE_OUTCOMES = ("hit", "stale", "evicted", "too_stale")
SKIP_REASONS = ("non_finite", "update_capped")
POOL_TIERS = ("device", "cpu")


def step_histogram(registry, model_name: str):
    return Histogram("alchemist_train_step_seconds", "Wall time of one training step.",
                     ["model_name"], buckets=STEP_BUCKETS, registry=registry).labels(model_name)


class TrainingCollector:
    """Scrape-time view of the trainer, the feedback backlog and the activation pool."""

    def __init__(self, state):
        self.state = state

    def describe(self):
        return []            # names are dynamic; registering must not call collect()

    def collect(self):
        state, name = self.state, [self.state.model_name]
        trainer = state.trainer
        totals = trainer.totals if trainer is not None else {}
        skipped = trainer.skipped if trainer is not None else {}
        quarantined = trainer.quarantine.counts if trainer is not None else {}
        yield _counter("alchemist_train_steps", "Optimizer steps taken (each publishes a version).",
                       name, [((), totals.get("steps", 0))])
        yield _counter("alchemist_train_tokens", "Tokens trained, by how their activations were obtained.",
                       name, [((p,), totals.get(f"tokens_{p}", 0)) for p in TOKEN_PATHS], ["path"])
        yield _counter("alchemist_activation_reuse", "Records trained, by what the activation pool held: "
                       "hit (exact), stale (within max_staleness), evicted, too_stale (recomputed).",
                       name, [((o,), totals.get(f"outcome_{o}", 0)) for o in REUSE_OUTCOMES], ["outcome"])
        yield _counter("alchemist_train_skipped_steps", "Steps not applied (non_finite) or applied with "
                       "a scaled-down update (update_capped).",
                       name, [((r,), skipped.get(r, 0)) for r in SKIP_REASONS], ["reason"])
        yield _counter("alchemist_train_quarantined", "Ratings quarantined (not trainable: skipped until an "
                       "admin retries them), by reason: too_long (over the context), oom (out of device "
                       "memory alone), error (its step raised alone while a probe step ran).",
                       name, [((r,), quarantined.get(r, 0)) for r in QUARANTINE_REASONS], ["reason"])
        loss = GaugeMetricFamily("alchemist_train_loss", "Loss of the last training step (absent before it).",
                                 labels=["model_name"])
        last = trainer.last if trainer is not None else None
        if last is not None and math.isfinite(last.loss):
            loss.add_metric(name, float(last.loss))
        yield loss
        yield _gauge("alchemist_adapter_version", "Adapter version new requests are served with.",
                     name, [((), state.adapter_version)])
        yield _gauge("alchemist_feedback_pending", "Ratings committed and not yet trained on.",
                     name, [((), _pending(state))])
        yield _gauge("alchemist_feedback_quarantined", "Ratings in the quarantine now (all runs).",
                     name, [((), _stored(state, "quarantined"))])
        yield from _keep_up_gauges(state, name)
        pool = state.llm.activation_pool
        sizes = pool.stats()["bytes"] if pool is not None else {}
        yield _gauge("alchemist_activation_pool_bytes", "Bytes of captured activations held, by tier.",
                     name, [((t,), sizes.get(t, 0)) for t in POOL_TIERS], ["tier"])
        yield from pool_families(pool, trainer, name)


KEEP_UP_GAUGES = (
    ("alchemist_feedback_backlog_tokens", "backlog_tokens", "Tokens of the ratings not yet taken into a "
     "training step: prompt + response of each rated completion (a better_response adds its prompt again "
     "and an estimate of its own tokens, UTF-8 bytes / 4)."),
    ("alchemist_feedback_oldest_pending_seconds", "oldest_pending_s", "Age of the oldest rating not yet "
     "taken into a training step (since it was made or last replaced; 0 when none waits)."),
    ("alchemist_train_tokens_per_second", "trained_tok_s", "Tokens trained per second over the last "
     "minute (a sliding window)."),
)
ZERO_KEEP_UP = {"backlog_ratings": 0, "backlog_tokens": 0, "oldest_pending_s": 0.0, "trained_tok_s": 0.0}


def _keep_up_gauges(state, name: list):
    trainer = state.trainer
    snap = keep_up_snapshot(state)
    for metric, key, doc in KEEP_UP_GAUGES:
        yield _gauge(metric, doc, name, [((), snap[key])])
    paused = trainer is not None and bool(trainer.paused)
    yield _gauge("alchemist_training_paused", "1 while online training is paused (by an admin or after a "
                 "failing step: GET /v1/training/status shows the last error), else 0.",
                 name, [((), int(paused))])


def keep_up_snapshot(state) -> dict:
    """The trainer's keep-up snapshot; with training off (or a trainer without one) the store's whole
    pending backlog and no training; zeros once the store is closed (shutting down)."""
    trainer = state.trainer
    keep_up = getattr(trainer, "keep_up", None)
    try:
        if keep_up is not None:
            return keep_up.snapshot(trainer.read_seq)
        return {**KeepUp(state.store).snapshot(0), "trained_tok_s": 0.0}
    except RuntimeError:
        return dict(ZERO_KEEP_UP)


def _pending(state) -> int:
    try:
        if state.trainer is not None:       # not counting those taken into a step (trained)
            return state.trainer.pending_count()
        return state.store.count_feedback("pending")
    except RuntimeError:                    # the store is closed (shutting down)
        return 0


def _stored(state, status: str) -> int:
    try:
        return state.store.count_feedback(status)
    except RuntimeError:                    # the store is closed (shutting down)
        return 0
