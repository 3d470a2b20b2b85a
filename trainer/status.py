"""What `GET /v1/training/status` shows of an OnlineTrainer (trainer/online.py): its state, the
quarantine, whether it keeps up with the ratings, the staleness of what it trained, its pacing."""
from __future__ import annotations


def trainer_status(trainer) -> dict:
    last, thread = trainer.last, trainer.thread
    return {"enabled": trainer.config.enabled, "paused": trainer.paused, "objective": trainer.config.objective,
            "adapter_version": trainer.port.live_version(), "trainer_version": trainer.version,
            "steps": trainer.step_count,
            "pending_feedback": trainer.pending_count(), "trained_since_checkpoint": len(trainer.unmarked),
            "quarantined_feedback": trainer.store.count_feedback("quarantined"),
            "quarantine": {"since_start": dict(trainer.quarantine.counts),
                           "recent": [f.to_quarantine_dict() for f in trainer.store.quarantined(limit=3)]},
            "kept_versions": trainer.adapters.versions(), "skipped_steps": dict(trainer.skipped),
            "keep_up": keep_up(trainer), "staleness": {str(k): n for k, n in sorted(trainer.staleness.items())},
            "latency_budget": None if thread is None or thread.budget is None else thread.budget.status(),
            "graphs": None if trainer.graphs is None else trainer.graphs.status(),
            "last_step": None if last is None else {
                "loss": last.loss, "outcomes": dict(last.outcomes), "reused_rows": last.reused_rows,
                "computed_rows": last.computed_rows, "response_tokens": last.response_tokens}}


def keep_up(trainer) -> dict | None:
    """The rated backlog and the training rate (trainer/keep_up.py); None once the store is closed."""
    try:
        return trainer.keep_up.snapshot(trainer.read_seq)
    except RuntimeError:
        return None
