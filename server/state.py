"""Everything a request handler needs, built once per process: engine, store, keys, metrics."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.embedded_model import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model
from engine.llm_engine import LLMEngine
from server.auth import ApiKeys
from server.config import ServerConfig
from server.metrics import Metrics
from server.tokens import TokenTexts
from store.feedback_store import FeedbackStore

log = logging.getLogger("alchemist.server")
PURGE_INTERVAL_S = 3600.0


def served_name(config: ServerConfig) -> str:
    name = config.served_model_name or config.engine.served_model_name
    if name:
        return name
    model = Path(config.engine.model)
    if model.name == DEFAULT_MODEL_NAME or model == default_model_dir():
        return DEFAULT_MODEL_NAME
    return model.name or DEFAULT_MODEL_NAME


class ServerState:
    def __init__(self, config: ServerConfig, engine: AsyncEngine, store: FeedbackStore):
        self.config = config
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.store = store
        self.model_name = served_name(config)
        self.api_keys = ApiKeys(config.api_keys)
        self.metrics = Metrics(self.model_name, self.llm)
        self.tokens = TokenTexts(self.tokenizer)
        self.adapter_version = 0                 # the trainer publishes newer versions here
        self.created = int(time.time())
        self._started = self._closed = False
        self._purge_task: asyncio.Task | None = None
        self._last_step_start: float | None = None
        engine.step_hooks.append(self._stamp_scheduled)

    @classmethod
    def build(cls, config: ServerConfig) -> "ServerState":
        if not config.engine.model:
            config.engine.model = str(ensure_default_model())
        engine = AsyncEngine(LLMEngine(config.engine), max_waiting=config.max_waiting)
        store = FeedbackStore(config.resolved_db_path(), config.retention_seconds)
        return cls(config, engine, store)

    # -- lifecycle (FastAPI lifespan) ---------------------------------------------
    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.engine.start()
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
        self.engine.shutdown()
        self.store.close()

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
    def healthy(self) -> bool:
        return self.engine.dead is None and not self._closed
