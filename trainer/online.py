"""The online trainer inside the serving process: committed feedback -> a training step (reuse of
captured activations, or recompute) -> AdamW on fp32 LoRA masters -> adapter version N+1, offered to the
engine through the trainer's port (engine.training_port.TrainingPort) and made live by the engine at its
next step boundary, so serving never sees a half-written adapter. The trainer never holds the engine.
One unit of work, `step()`, runs where `training.concurrency` says: on a trainer thread
(`trainer/background.py`; on CUDA a low-priority stream beside serving's; `start()` / `stop()`) or
interleaved on the engine thread (the server installs `step` as the engine's step hook). A duty cycle
bounds the share of wall time steps may take while serving.

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

from common.errors import ConfigError
from engine.training_port import TrainingPort
from trainer import checkpoint as ckpt
from trainer.adapters import AdapterManager, cap_update, check_state
from trainer.background import TrainerThread
from trainer.compiled_layer import compiled_layers
from trainer.config import TrainerConfig
from trainer.lora import LoRAConfig
from trainer.objectives import RunningMean, batch_loss
from trainer.pacing import StepPacing
from trainer.fetch_planner import planner_for
from trainer.graphed_layers import check_graphs, graphed_layers
from trainer.keep_up import KeepUp
from trainer.isolation import NonFiniteStep, Quarantine, RatingWork, rating_work, train_bisecting, watermark
from trainer.reuse import TrainRecord
from trainer.status import trainer_status
from trainer.step import StepResult, forward_backward, probe_records, warm_up
from trainer.user_text import prompt_lm_positions
from trainer.versions import Versions

log = logging.getLogger("alchemist.trainer")


class OnlineTrainer:
    def __init__(self, config: TrainerConfig, port: TrainingPort, store, run_dir: Path, base_model: str = "",
                 on_step=None):
        self.config, self.port, self.store = config, port, store
        self.compiled = compiled_layers(config, port.device)        # raises first: no side effects yet
        check_graphs(config, port.device)
        self.run_dir, self.base_model = Path(run_dir), base_model
        self.on_step = on_step or (lambda seconds: None)           # a step trained, in this many seconds
        self.lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, targets=tuple(config.lora_targets))
        self.adapters = AdapterManager(port.model, self.lora)
        port.invalidate_graphs()               # decode graphs must replay the adapted modules
        self.masters = self.adapters.masters(0)    # a checkpoint, if any, is loaded below
        self.names = sorted(self.masters)
        self.optimizer = torch.optim.AdamW([t for n in self.names for t in self.masters[n]], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.baseline = RunningMean(config.baseline_momentum)
        self.lock = threading.Lock()
        self.paused = False
        self.last_error: str | None = None        # the last training failure (training pauses on one)
        self.step_count = 0
        self.versions = Versions(self.adapters, port.offer, self.run_dir)
        self.totals = Counter()            # tokens by path, outcomes by kind, steps, seconds, cpu_seconds
        self.staleness = Counter()         # trained ratings by versions between serving and training them
        self.keep_up = KeepUp(store)       # the rated backlog and trained tok/s (metrics, status)
        self.fetch_planner = planner_for(port.activation_pool, port.device)   # which host rows to fetch
        self.read_seq = 0                  # highest feedback seq taken into a step (in memory)
        self.unmarked: list[int] = []      # feedback seqs trained since the last durable checkpoint
        self.quarantine = Quarantine(store, config.max_consecutive_quarantines)   # ratings it cannot train
        # a record longer than the context is never run (on CUDA: a device-side assert that breaks serving)
        self.max_positions = port.max_model_len
        self.skipped = Counter()
        self.last: StepResult | None = None
        self.prompt_lm_targets = prompt_lm_positions(port.tokenizer)     # the users' message tokens
        self._saved = (0, 0)               # (version, step) of the last durable checkpoint
        threaded = config.concurrency == "thread" or (config.concurrency == "auto" and port.device.type == "cuda")
        self.thread = TrainerThread(self) if threaded else None
        self.pacing = StepPacing(config, threaded)
        loaded = ckpt.load_latest(self.run_dir)
        if loaded is not None:
            self._load(*loaded)
        warm_up(port.model, self._adapter_map(), port.hf_config.vocab_size, port.device,
                port.activation_pool, self.compiled)
        self.graphs = graphed_layers(config, port.model, self._adapter_map(), port.device)
        if self.graphs is not None:          # captured now, before serving; steps replay them
            self.graphs.capture_all(port.hf_config.hidden_size, next(port.model.parameters()).dtype)
            self.compiled = self.graphs
        self.optimizer.zero_grad(set_to_none=True)
        if port.device.type == "cuda":     # adapters made on this thread's stream: ready before serving's
            torch.cuda.synchronize(port.device)

    def start(self) -> None:
        """Start the trainer thread (thread mode; interleaved mode trains from the engine's step hook)."""
        if self.thread is not None:
            self.thread.start()

    def stop(self, timeout: float = 120.0) -> bool:
        return self.thread.stop(timeout) if self.thread is not None else True

    @property
    def version(self) -> int:
        """The version the masters hold: the trainer's own fact (its gradients are taken against it); the
        version serving uses is the engine's (`port.live_version()`), the same once the offer is applied."""
        return self.versions.current

    @property
    def next_version(self) -> int:
        return self.versions.next

    @property
    def pending_activation(self) -> int | None:
        return self.versions.pending_activation

    # -- lifecycle -------------------------------------------------------------
    def _load(self, state, lora, optimizer_state, meta) -> None:
        """Continue from a checkpoint: masters, optimizer, baseline, step, published version."""
        if lora != self.lora:
            raise ConfigError(f"run {self.run_dir} was trained with {lora}, the config asks for {self.lora}: "
                              "use another training.run_name (or the run's LoRA settings)")
        check_state(state, self.adapters.shapes())     # a run trained for another model: ConfigError
        self._set_masters(state)
        self.optimizer.load_state_dict(optimizer_state)
        if meta.get("baseline"):
            self.baseline.load_state_dict(meta["baseline"])
        self.step_count = meta["step"]
        if meta["version"] > 0:
            self.versions.publish(self.masters, meta["version"])
        self.versions.next = max(self.versions.next, int(meta.get("next_version", 0)))
        if isinstance(meta.get("trained_seqs"), list) and meta["trained_seqs"]:
            self.store.mark_trained(meta["trained_seqs"])   # a crash between save and mark: mark now
        self._saved = (self.version, self.step_count)
        log.info("trainer: resumed %s at version %d, step %d", self.run_dir, self.version, self.step_count)

    @property
    def dirty(self) -> bool:
        """Whether anything happened since the last durable checkpoint."""
        return bool(self.unmarked) or self._saved != (self.version, self.step_count)

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

    # -- the unit of work -----------------------------------------------------------
    def step(self) -> bool:
        """Apply a requested rollback, then train one step if allowed and feedback is waiting; True if a
        step trained. The engine's step hook (interleaved mode) or the trainer thread's loop. A failure
        pauses training (serving goes on) and is kept in `last_error` until `resume`."""
        try:
            return self._work()
        except Exception as err:
            log.exception("training step failed; training paused (POST /v1/training/resume retries)")
            self.last_error = f"{type(err).__name__}: {err}"
            self.pause()
            return False

    def _work(self) -> bool:
        """Apply a requested rollback, then train one step if allowed and feedback is waiting."""
        if self.versions.pending_activation is not None:
            self._apply_activation()
        if not self.config.enabled or self.paused:
            return False
        now = time.monotonic()
        if not self.pacing.may_look(now, serving=self.port.has_unfinished()):
            return False
        pending = self.store.pending_feedback(self.read_seq, self.config.max_records_per_step)
        if not self.pacing.batch_ready(len(pending), now):
            return False
        t, cpu = time.monotonic(), time.thread_time()
        with self.lock:
            self._train(self._take(pending))
        spent = time.monotonic() - t
        self.pacing.spent(spent)
        self.totals["seconds"] += spent
        self.totals["cpu_seconds"] += time.thread_time() - cpu     # this thread's host time in the step
        self.on_step(spent)
        return True

    def _take(self, pending) -> list[RatingWork]:
        taken, tokens, trained = [], 0, set(self.unmarked)
        for feedback, completion in pending:
            if feedback.seq in trained:    # trained in a step that halted midway: marked at the checkpoint
                continue
            work = rating_work(feedback, completion, self.port.tokenizer, self.max_positions, self._counts)
            if taken and tokens + work.tokens > self.config.step_tokens:
                break
            taken.append(work)
            tokens += work.tokens
            self._pin(work.record.key)     # no eviction while the step reads its rows (the engine runs on)
        return taken

    def _train(self, taken: list[RatingWork]) -> None:
        """One optimizer step over the taken ratings; a failing step is bisected to the ratings at fault,
        which are quarantined (trainer/isolation.py) while the others train. A failure that is not a
        rating's raises (training pauses): the ratings not trained stay pending, still pinned."""
        done = [w for w in taken if w.problem or not w.trainable]
        for work in done:
            if work.problem:
                self.quarantine.put(work.feedback, *work.problem)
            else:                          # nothing for the objective to learn (sft: a bad rating)
                self.unmarked.append(work.feedback.seq)

        version = self.version             # what the step's gradients are taken against

        def trained(works: list[RatingWork]) -> None:
            self.unmarked += [w.feedback.seq for w in works]
            self.staleness.update(version - w.served_version for w in works)
            self.keep_up.trained(sum(w.tokens for w in works))
            self.quarantine.reset()
            done.extend(works)

        def isolate(work: RatingWork, err: Exception) -> None:
            if not self._probe_ok():       # the trainer cannot train at all: not this rating's fault
                raise err
            done.append(work)
            self.quarantine.failed(work.feedback, err)     # TrainingHalted after too many in a row

        try:
            train_bisecting([w for w in taken if w.trainable and not w.problem], self._optimize, trained, isolate)
        finally:
            self._finish(taken, done)
        if self.unmarked and self.step_count - self._saved[1] >= self.config.checkpoint_every:
            self.checkpoint()

    def _finish(self, taken: list[RatingWork], done: list[RatingWork]) -> None:
        if self.port.device.type == "cuda":     # the step's reads of pool rows are done before release
            torch.cuda.current_stream(self.port.device).synchronize()
        for work in done:
            self._release(work.record.key)
        self.read_seq = watermark(taken, done, self.read_seq)

    def _probe_ok(self) -> bool:
        """Whether a 12-token step (forward and backward, no update) runs: if it does, a rating whose
        step fails alone is at fault; if not, the trainer is."""
        try:
            result = forward_backward(self.port.model, probe_records(self.port.hf_config.vocab_size),
                                      self._adapter_map(), reuse=False, compiled=self.compiled)
            return math.isfinite(result.loss)      # non-finite adapters: the trainer's fault
        except Exception:
            log.warning("trainer: the probe step failed too", exc_info=True)
            return False
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def _counts(self, record: TrainRecord) -> bool:
        """Whether the objective learns anything from this record (sft ignores bad and neutral)."""
        return record.weight > 0 if self.config.objective == "sft" else record.weight != 0

    def _release(self, key) -> None:
        if self.port.activation_pool is not None and key is not None:
            self.port.activation_pool.release(key)

    # -- one optimizer step ------------------------------------------------------
    def _loss(self, logprobs: list[torch.Tensor], records: list[TrainRecord]) -> torch.Tensor:
        return batch_loss(self.config, self.baseline, logprobs, records)

    def _adapter_map(self) -> dict:
        return self.adapters.training_adapters(self.masters)

    def _optimize(self, records: list[TrainRecord]) -> None:
        params = [t for n in self.names for t in self.masters[n]]
        self.optimizer.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in params] if self.config.max_update_norm else None
        result = forward_backward(self.port.model, records, self._adapter_map(),
                                  pool=self.port.activation_pool, reuse=self.config.reuse,
                                  trainer_version=self.version,
                                  max_staleness=self.config.max_staleness, loss_fn=self._loss,
                                  prompt_lm_weight=self.config.prompt_lm_weight,
                                  prompt_lm_targets=self.prompt_lm_targets,
                                  between_layers=self._gate(), compiled=self.compiled,
                                  buckets=self.config.step_buckets(), fetch_planner=self.fetch_planner)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if not (math.isfinite(result.loss) and math.isfinite(float(grad_norm))):
            self.skipped["non_finite"] += 1
            self.optimizer.zero_grad(set_to_none=True)     # nothing applied, nothing published
            raise NonFiniteStep(f"non-finite step: loss {result.loss}, gradient norm {float(grad_norm)}")
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
        self.totals.update({f"pool_rows_{k}": n for k, n in result.pool_rows.items()})   # e.g. pool_rows_cpu/down
        self.totals["served_prompt_rows"] += sum(len(r.prompt_ids) for r in records if r.key is not None)
        self.versions.publish(self.masters)

    def _gate(self):
        """On the trainer thread: pace its units of work between layers (trainer.background.TrainingGate)."""
        return self.thread.gate if self.thread is not None and self.thread.gate.active else None

    def _cap_update(self, params, before) -> None:
        if cap_update(params, before, self.config.max_update_norm):
            self.skipped["update_capped"] += 1

    # -- control (server thread) ---------------------------------------------------
    def pin_for_feedback(self, response_id: str, choice_index: int) -> None:
        """Feedback arrived: keep that record's activations until it is trained, and look for it now."""
        self._pin((response_id, choice_index))
        self.wake()

    def wake(self) -> None:
        """Look for pending feedback now (a rating arrived, came back from the quarantine, or resume)."""
        self.pacing.poll_now()
        if self.thread is not None:
            self.thread.wake()

    def _pin(self, key) -> None:
        if self.port.activation_pool is not None and key is not None:   # gone (trained, evicted): nothing to keep
            self.port.activation_pool.pin_if_present(key)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused, self.last_error = False, None
        self.quarantine.reset()
        self.wake()

    def request_activate(self, version: int) -> None:
        """Roll back (or forward) to a kept version; live at the next engine step boundary after the
        trainer took it (between its steps)."""
        self.versions.request_activate(version)
        if self.thread is not None:
            self.thread.wake()

    def _apply_activation(self) -> None:
        version = self.versions.take_activation()
        with self.lock:
            self._set_masters(self.adapters.kept(version))   # copied into the masters
            self.versions.activate(version)

    @torch.no_grad()
    def _set_masters(self, state) -> None:
        for name in self.names:
            for master, saved in zip(self.masters[name], state[name]):
                master.copy_(saved)

    def status(self) -> dict:
        return trainer_status(self)

    def pending_count(self) -> int:
        """Ratings waiting to be trained (pending, not yet read; a step halted midway may have trained
        some past the read watermark: those are not waiting)."""
        trained_unread = sum(seq > self.read_seq for seq in self.unmarked)
        return self.store.count_feedback("pending", after_seq=self.read_seq) - trained_unread
