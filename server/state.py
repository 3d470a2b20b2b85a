"""Everything a request handler needs, built once per process: engine, store, keys, metrics, and the
online trainer (on its own thread, or between engine steps on the engine thread: training.concurrency)."""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.embedded_model import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model
from engine.llm_engine import LLMEngine
from engine.setup import build_activation_pool, build_engine_parts
from server.auth import ApiKeys
from server.config import ServerConfig
from server.memory_metrics import MemoryCollector
from server.metrics import Metrics
from server.tokens import TokenTexts
from server.training_metrics import TrainingCollector, step_histogram
from store.feedback_store import FeedbackStore
from trainer.online import OnlineTrainer

log = logging.getLogger("alchemist.server")
PURGE_INTERVAL_S = 3600.0


def served_name(config: ServerConfig) -> str:
    name = config.served_model_name
    if name:
        return name
    model = Path(config.engine.model)
    if model.name == DEFAULT_MODEL_NAME or model == default_model_dir():
        return DEFAULT_MODEL_NAME
    return model.name or DEFAULT_MODEL_NAME


class ServerState:
    def __init__(self, config: ServerConfig, engine: AsyncEngine, store: FeedbackStore,
                 run_dir: Path | None = None):
        self.config = config
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.store = store
        self.model_name = served_name(config)
        self.api_keys = ApiKeys(config.api_keys, config.admin_api_keys)
        self.metrics = Metrics(self.model_name, self.llm)
        self.tokens = TokenTexts(self.tokenizer)
        self.created = int(time.time())
        self._started = self._closed = False
        self._purge_task: asyncio.Task | None = None
        self._last_step_start: float | None = None
        engine.step_hooks.append(self._stamp_scheduled)
        self.trainer: OnlineTrainer | None = None
        self.run_dir = Path(run_dir) if run_dir else config.resolved_run_dir()
        self.step_seconds = step_histogram(self.metrics.registry, self.model_name)
        if config.training.enabled:                # LoRA goes in before the engine thread serves
            self.trainer = OnlineTrainer(config.training, self.llm.training_port(), store, self.run_dir,
                                         base_model=config.engine.model, on_step=self.step_seconds.observe)
            if self.trainer.thread is None:      # interleaved: train between engine steps
                engine.step_hooks.append(self.trainer.step)
            self.llm.apply_adapter_offer()       # the engine thread has not started: a resumed version
                                                 # is live before the first request or status read
        self.metrics.registry.register(TrainingCollector(self))
        self.metrics.registry.register(MemoryCollector(self.model_name, self.llm, self.trainer is not None))

    @classmethod
    def build(cls, config: ServerConfig, run_dir: Path | None = None) -> "ServerState":
        """run_dir: the trainer's checkpoints (default $ALCHEMIST_HOME/runs/<training.run_name>)."""
        if not config.engine.model:
            config.engine.model = str(ensure_default_model())
        parts = build_engine_parts(config.engine)
        pool = build_activation_pool(config.engine, parts)     # before the engine sizes its KV cache
        engine = AsyncEngine(LLMEngine(config.engine, parts, pool), max_waiting=config.max_waiting)
        store = FeedbackStore(config.resolved_db_path(), config.retention_seconds)
        try:
            return cls(config, engine, store, run_dir)
        except BaseException:                    # e.g. a run trained for another model
            store.close()
            raise

    # -- lifecycle (FastAPI lifespan) ---------------------------------------------
    async def start(self) -> None:
        if not self._started:
            self._started = True
            gc.freeze()     # what start-up built is never garbage: later collections skip it (shorter GIL holds)
            self.engine.start()
            if self.trainer is not None:
                self.trainer.start()
        self._purge_task = asyncio.create_task(self._purge_loop())

    async def stop(self) -> None:
        if self._purge_task is not None:
            self._purge_task.cancel()
            await asyncio.gather(self._purge_task, return_exceptions=True)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.shutdown()                   # no training step runs after this returns
        try:
            self._final_checkpoint()
        finally:
            self.store.close()

    def _final_checkpoint(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        trainer.pause()
        trainer.stop()
        if not trainer.lock.acquire(timeout=120):    # the step under way did not end in time
            log.error("final checkpoint skipped: a training step is still running")
            return
        try:
            if trainer.dirty:
                log.info("final checkpoint: %s", trainer.checkpoint())
        except Exception:                        # the last durable checkpoint still stands
            log.exception("final checkpoint failed")
        finally:
            trainer.lock.release()

    async def _purge_loop(self) -> None:
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.purge_expired)
                if deleted:
                    log.info("retention: purged %d rows", deleted)
            except Exception:                    # never let a purge failure stop serving
                log.exception("retention purge failed")
            await asyncio.sleep(PURGE_INTERVAL_S)

    # -- engine thread ------------------------------------------------------------
    def _stamp_scheduled(self) -> None:
        """Step hook: a running sequence without first_scheduled_time was admitted by the step
        that began right after the previous hook call (queue-time metric)."""
        now = time.monotonic()
        stamp = self._last_step_start or now
        for seq in self.llm.scheduler.running:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = stamp
        self._last_step_start = now

    @property
    def train_error(self) -> str | None:
        return self.trainer.last_error if self.trainer else None

    @property
    def adapter_version(self) -> int:
        """The version new tokens are served with: the engine's (its one owner)."""
        return self.llm.adapter_version

    @property
    def healthy(self) -> bool:
        return self.engine.dead is None and not self._closed
