"""Runs the engine loop on its own thread; asyncio callers stream deltas without blocking the event loop."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from common.errors import AlchemistError, OverloadedError
from engine.llm_engine import LLMEngine
from engine.output_processor import SeqDelta
from engine.sampling_params import SamplingParams

log = logging.getLogger("alchemist.engine")


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    first_choice: tuple[str, int] | None
    sink: "_Sink"


@dataclass
class _Abort:
    request_id: str


class _Sink:
    """Delivers deltas from the engine thread into one request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineDeadError(AlchemistError):
    status_code = 500
    error_type = "server_error"


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting       # requests waiting to be scheduled before OverloadedError
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        # requests waiting to be scheduled = adds not yet taken by the engine thread + the requests
        # in the scheduler's waiting queue. Each counter has one writing thread (ints: atomic reads).
        self._adds_sent = 0                  # event loop
        self._adds_taken = 0                 # engine thread
        self._engine_waiting = 0             # engine thread: distinct requests in scheduler.waiting
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alchemist-engine", daemon=True)
        self.step_hooks: list = []          # callables run on the engine thread between steps
        self.dead: BaseException | None = None
        engine.adapter.on_offer = self._wake.set   # an idle loop applies an offered version at once

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():            # never started (a tool or test that drives steps itself)
            self._thread.join(timeout=30)

    # -- asyncio side ----------------------------------------------------------
    def num_pending(self) -> int:
        """Requests in flight (waiting or running)."""
        return len(self._sinks)

    def num_waiting(self) -> int:
        """Requests waiting to be scheduled (what max_waiting bounds); running ones do not count."""
        return max(0, self._adds_sent - self._adds_taken) + self._engine_waiting

    def check_capacity(self, count: int = 1) -> None:
        """OverloadedError (429) unless `count` more requests fit in the waiting queue now."""
        waiting = self.num_waiting()
        if waiting + count > self.max_waiting:
            raise OverloadedError(f"{waiting} requests are waiting to be scheduled (max_waiting="
                                  f"{self.max_waiting}); retry shortly", retry_after=1.0)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       first_choice: tuple[str, int] | None = None) -> AsyncIterator[SeqDelta]:
        """Yield deltas of every choice of the request until all are finished; abort on cancel. A request
        the engine cannot serve raises its InvalidRequestError here (from `add_request`, on the engine
        thread); the server checks every prompt of an API call before it starts any (server/serving.py)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        self.check_capacity()
        sink = _Sink(asyncio.get_running_loop())
        self._sinks[request_id] = sink
        self._adds_sent += 1
        self._submit(_Add(request_id, prompt_token_ids, params, first_choice, sink))
        remaining = params.n
        try:
            while remaining:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._sinks.pop(request_id, None)
            if remaining:
                self._submit(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def _submit(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine thread ---------------------------------------------------------
    def _apply_commands(self) -> None:
        taken, applied = 0, 0
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            applied += 1
            if isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.first_choice)
            except AlchemistError as err:
                cmd.sink.put(err)
            taken += 1
        if applied:                           # publish the queue first: a reader may count one twice,
            self._publish_waiting()           # never miss one
            self._adds_taken += taken

    def _publish_waiting(self) -> None:
        waiting = self.engine.scheduler.waiting
        self._engine_waiting = len({seq.request_id for seq in waiting}) if waiting else 0

    def _loop(self) -> None:
        try:
            if self.engine.runner.stream is not None:   # every device op of this thread: the serving stream
                torch.cuda.set_stream(self.engine.runner.stream)
            while not self._stop.is_set():
                self._apply_commands()
                for hook in self.step_hooks:
                    hook()
                self.engine.apply_adapter_offer()     # also while idle: an offer goes live at once
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for delta in self.engine.step():
                    sink = self._sinks.get(delta.request_id)
                    if sink is not None:
                        sink.put(delta)
                self._publish_waiting()
        except BaseException as err:          # a bug or device failure: fail every waiter, loudly
            log.exception("engine loop died")
            self.dead = err
            for sink in list(self._sinks.values()):
                sink.put(EngineDeadError(f"the engine stopped: {err}"))
