"""The online trainer inside the serving process: committed feedback -> a training step (reuse of
captured activations, or recompute) -> AdamW on fp32 LoRA masters -> publish adapter version N+1 at
an engine step boundary. `maybe_step()` runs on the engine thread between engine steps, so serving
never sees a half-written adapter; a duty cycle bounds how much of that thread training may take.

Exactly-once: feedback is marked trained in the store only after a checkpoint that contains its
update is durable. After a crash, the adapter restarts from that checkpoint and the feedback trained
since (not marked) is trained again from there by recompute — so each one counts once."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from engine.errors import ConfigError, NotFoundError
from trainer import checkpoint as ckpt
from trainer.adapters import AdapterManager, check_state
from trainer.config import TrainerConfig
from trainer.lora import LoRAConfig
from trainer.objectives import RunningMean, kto_loss, pg_loss, sft_loss
from trainer.reuse import TrainRecord
from trainer.step import StepResult, forward_backward

log = logging.getLogger("alchemist.trainer")
DUTY_WINDOW_S = 30.0
FEEDBACK_POLL_S = 1.0       # after an empty look, the store is asked again this late unless feedback arrives


class OnlineTrainer:
    def __init__(self, config: TrainerConfig, engine, store, run_dir: Path, base_model: str = "",
                 on_publish=None):
        self.config, self.engine, self.store = config, engine, store
        self.run_dir, self.base_model = Path(run_dir), base_model
        self.on_publish = on_publish or (lambda version: None)
        self.lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, targets=tuple(config.lora_targets))
        self.adapters = AdapterManager(engine.runner.model, self.lora)
        engine.runner.invalidate_graphs()      # decode graphs must replay the adapted modules
        self.masters = self.adapters.masters()
        self.names = sorted(self.masters)
        self.optimizer = torch.optim.AdamW([t for n in self.names for t in self.masters[n]], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.baseline = RunningMean(config.baseline_momentum)
        self.lock = threading.Lock()
        self.paused = False
        self.last_error: str | None = None        # the last training failure (training pauses on one)
        self.step_count, self.version = 0, 0
        self.next_version = 1              # published versions only increase, also after a rollback
        self._pending_activation: int | None = None
        self.totals = Counter()            # tokens by path, outcomes by kind, steps, seconds
        self.read_seq = 0                  # highest feedback seq taken into a step (in memory)
        self.unmarked: list[int] = []      # feedback seqs trained since the last durable checkpoint
        self.skipped = Counter()
        self.last: StepResult | None = None
        self.busy_s, self.window_start = 0.0, time.monotonic()   # duty cycle over a sliding window
        self._next_poll = 0.0              # no SQLite query on every engine step while nothing is pending
        self._waiting_since: float | None = None   # when the pending ratings started to wait for a full step
        self._saved = (0, 0)               # (version, step) of the last durable checkpoint
        self._resume()

    # -- lifecycle -------------------------------------------------------------
    def _resume(self) -> None:
        hint = self._read_next_version()      # numbers served before a crash are never published again
        loaded = ckpt.load_latest(self.run_dir)
        if loaded is not None:
            self._load(*loaded)
        self.next_version = max(self.next_version, hint)

    def _load(self, state, lora, optimizer_state, meta) -> None:
        """Continue from a checkpoint: masters, optimizer, baseline, step, published version."""
        if lora != self.lora:
            raise ConfigError(f"run {self.run_dir} was trained with {lora}, the config asks for {self.lora}: "
                              "use another training.run_name (or the run's LoRA settings)")
        check_state(state, self.adapters.shapes())     # a run trained for another model: ConfigError
        with torch.no_grad():
            for name in self.names:
                for master, saved in zip(self.masters[name], state[name]):
                    master.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        if meta.get("baseline"):
            self.baseline.load_state_dict(meta["baseline"])
        self.step_count = meta["step"]
        if meta["version"] > 0:
            self._publish(meta["version"])
        self.next_version = max(self.next_version, int(meta.get("next_version", 0)))
        if isinstance(meta.get("trained_seqs"), list) and meta["trained_seqs"]:
            self.store.mark_trained(meta["trained_seqs"])   # a crash between save and mark: mark now
        self._saved = (self.version, self.step_count)
        log.info("trainer: resumed %s at version %d, step %d", self.run_dir, self.version, self.step_count)

    def _publish(self, version: int) -> None:
        self.adapters.publish(self.masters, version)
        self.version = version
        self.next_version = max(self.next_version, version + 1)
        self.engine.adapter_version = version
        self._write_next_version()
        self.on_publish(version)

    def _write_next_version(self) -> None:
        """Survives kill -9 (page cache), so a restart never reuses a number served before the crash."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / ".next_version.tmp"
        tmp.write_text(f"{self.next_version}\n")
        tmp.replace(self.run_dir / "next_version")

    def _read_next_version(self) -> int:
        try:
            return int((self.run_dir / "next_version").read_text())
        except (OSError, ValueError):
            return 0

    @property
    def dirty(self) -> bool:
        """Whether anything happened since the last durable checkpoint."""
        return bool(self.unmarked) or self._saved != (self.version, self.step_count)

    @property
    def pending_activation(self) -> int | None:
        return self._pending_activation

    def checkpoint(self) -> Path:
        meta = {"version": self.version, "step": self.step_count, "baseline": self.baseline.state_dict(),
                "trained_seqs": list(self.unmarked), "next_version": self.next_version, "time": time.time()}
        path = ckpt.save_checkpoint(self.run_dir, self.adapters.state(self.version), self.lora,
                                    self.optimizer.state_dict(), meta, self.base_model)
        self._saved = (self.version, self.step_count)
        if self.unmarked:
            self.store.mark_trained(self.unmarked)
            self.unmarked = []
        ckpt.prune(self.run_dir)
        return path

    # -- the step hook -----------------------------------------------------------
    def maybe_step(self) -> bool:
        """Train one step if allowed and feedback is waiting; called on the engine thread."""
        if self._pending_activation is not None:
            self._apply_activation()
        if not self.config.enabled or self.paused:
            return False
        now = time.monotonic()
        if now - self.window_start > DUTY_WINDOW_S:           # halve the history: recent time counts most
            self.busy_s, self.window_start = self.busy_s / 2, now - DUTY_WINDOW_S / 2
        if self.engine.has_unfinished() and self.busy_s > self.config.duty_cycle * (now - self.window_start):
            return False
        if now < self._next_poll:
            return False
        pending = self.store.pending_feedback(self.read_seq, self.config.max_records_per_step)
        if not self._batch_ready(len(pending), now):
            self._next_poll = now + FEEDBACK_POLL_S
            return False
        t = time.monotonic()
        with self.lock:
            self._train(self._take(pending))
        spent = time.monotonic() - t
        self.busy_s += spent
        self.totals["seconds"] += spent
        return True

    def _batch_ready(self, num_pending: int, now: float) -> bool:
        """A step waits for min_records_per_step ratings, or until the first waiting one is max_wait_s
        old (steps of one rating each would publish a version per rating and learn noisily)."""
        if num_pending == 0:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        if num_pending < self.config.min_records_per_step and now - self._waiting_since < self.config.max_wait_s:
            return False
        self._waiting_since = None
        return True

    def _take(self, pending) -> list[tuple[object, TrainRecord]]:
        taken, tokens = [], 0
        for feedback, completion in pending:
            record = TrainRecord((feedback.response_id, feedback.choice_index), completion.prompt_token_ids,
                                 completion.response_token_ids, completion.logprobs, feedback.reward())
            size = len(record.prompt_ids) + len(record.response_ids)
            if taken and tokens + size > self.config.step_tokens:
                break
            taken.append((feedback, record))
            tokens += size
        return taken

    def _train(self, taken) -> None:
        self.read_seq = max(fb.seq for fb, _ in taken)
        trainable = [r for _, r in taken if len(r.response_ids) >= 1 and self._counts(r)]
        trainable += [self._better_response(fb, r) for fb, r in taken if fb.better_response]
        trainable = [r for r in trainable if r is not None]
        seqs = [fb.seq for fb, _ in taken]
        if trainable:
            self._optimize(trainable)
        self.unmarked += seqs
        for _, r in taken:
            self._release(r.key)
        if self.step_count and self.step_count % self.config.checkpoint_every == 0 and self.unmarked:
            self.checkpoint()

    def _counts(self, record: TrainRecord) -> bool:
        """Whether the objective learns anything from this record (sft ignores bad and neutral)."""
        return record.weight > 0 if self.config.objective == "sft" else record.weight != 0

    def _better_response(self, feedback, record: TrainRecord) -> TrainRecord | None:
        """A user-written better answer: an SFT target trained by recompute (never served)."""
        tok = self.engine.tokenizer
        if tok is None:
            return None
        ids = tok(feedback.better_response, add_special_tokens=False).input_ids
        eos = tok.eos_token_id
        ids = ids + ([eos] if isinstance(eos, int) else [])
        return TrainRecord(None, record.prompt_ids, ids, [0.0] * len(ids), 1.0)

    def _release(self, key) -> None:
        pool = self.engine.activation_pool
        if pool is not None and key is not None and pool.get(key) is not None:
            pool.release(key)

    # -- one optimizer step ------------------------------------------------------
    def _loss(self, logprobs: list[torch.Tensor], records: list[TrainRecord]) -> torch.Tensor:
        """The configured objective over served records + SFT over user-written better answers."""
        device = logprobs[0].device
        served = [i for i, r in enumerate(records) if r.key is not None]
        better = [i for i, r in enumerate(records) if r.key is None]
        total = logprobs[0].sum() * 0.0
        if better:
            total = total + sft_loss([logprobs[i] for i in better], torch.ones(len(better), device=device))
        if not served:
            return total
        lp = [logprobs[i] for i in served]
        rewards = torch.tensor([records[i].weight for i in served], device=device)
        ref = [torch.tensor(records[i].serving_logprobs, device=device) for i in served]
        if self.config.objective == "sft":
            return total + sft_loss(lp, rewards)
        if self.config.objective == "kto":
            return total + kto_loss(lp, ref, rewards > 0, beta=self.config.kto_beta)
        advantages = self.baseline.advantages(rewards)
        return total + pg_loss(lp, ref, advantages, clip_eps=self.config.pg_clip)

    def _adapter_map(self) -> dict:
        return self.adapters.training_adapters(self.masters)

    def _optimize(self, records: list[TrainRecord]) -> None:
        params = [t for n in self.names for t in self.masters[n]]
        self.optimizer.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in params] if self.config.max_update_norm else None
        result = forward_backward(self.engine.runner.model, records, self._adapter_map(),
                                  pool=self.engine.activation_pool, reuse=True, trainer_version=self.version,
                                  max_staleness=self.config.max_staleness, loss_fn=self._loss,
                                  prompt_lm_weight=self.config.prompt_lm_weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if not (math.isfinite(result.loss) and math.isfinite(float(grad_norm))):
            self.skipped["non_finite"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("trainer: non-finite loss or gradient; step skipped, nothing published")
            return
        self.optimizer.step()
        if before is not None:
            self._cap_update(params, before)
        if self.config.objective == "pg":
            self.baseline.update(torch.tensor([r.weight for r in records if r.key is not None] or [0.0]))
        self.step_count += 1
        self.last = result
        self.totals["steps"] += 1
        self.totals.update({f"tokens_{path}": n for path, n in result.tokens_by_path.items()})
        self.totals.update({f"outcome_{k}": n for k, n in result.outcomes.items()})
        self._publish(self.next_version)

    @torch.no_grad()
    def _cap_update(self, params, before) -> None:
        deltas = [p - b for p, b in zip(params, before)]
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
        if norm > self.config.max_update_norm:
            scale = self.config.max_update_norm / norm
            for p, b, d in zip(params, before, deltas):
                p.copy_(b + d * scale)
            self.skipped["update_capped"] += 1

    # -- control (server thread) ---------------------------------------------------
    def pin_for_feedback(self, response_id: str, choice_index: int) -> None:
        """Feedback arrived: keep that record's activations until it is trained, and look for it now."""
        self._next_poll = 0.0
        pool = self.engine.activation_pool
        key = (response_id, choice_index)
        try:
            if pool is not None and pool.get(key) is not None:
                pool.pin(key)
        except NotFoundError:                   # trained and released meanwhile: nothing to keep
            pass

    def step_or_pause(self) -> bool:
        """The engine's step hook: maybe_step, but a failure pauses training (serving goes on) and is
        kept in `last_error` until `resume`."""
        try:
            return self.maybe_step()
        except Exception as err:
            log.exception("training step failed; training paused (POST /v1/training/resume retries)")
            self.last_error = f"{type(err).__name__}: {err}"
            self.pause()
            return False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused, self.last_error = False, None

    def request_activate(self, version: int) -> None:
        """Roll back (or forward) to a kept version at the next engine step boundary."""
        self.adapters.state(version)            # NotFoundError now if the version is not kept
        self._pending_activation = version

    def _apply_activation(self) -> None:
        version, self._pending_activation = self._pending_activation, None
        with self.lock:
            state = self.adapters.state(version)
            with torch.no_grad():
                for name in self.names:
                    for master, saved in zip(self.masters[name], state[name]):
                        master.copy_(saved)
            self.adapters.activate(version)
            self.version = version
            self.engine.adapter_version = version
            self.on_publish(version)

    def status(self) -> dict:
        last = self.last
        return {"enabled": self.config.enabled, "paused": self.paused, "objective": self.config.objective,
                "adapter_version": self.version, "steps": self.step_count,
                "pending_feedback": self.store.count_feedback("pending"),
                "kept_versions": self.adapters.versions(), "skipped_steps": dict(self.skipped),
                "last_step": None if last is None else {
                    "loss": last.loss, "outcomes": dict(last.outcomes), "reused_rows": last.reused_rows,
                    "computed_rows": last.computed_rows, "response_tokens": last.response_tokens}}
