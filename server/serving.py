"""One API request = one engine request per prompt. Collects each choice's deltas, updates metrics,
and records every finished choice in the feedback store BEFORE its last delta is passed on, so an id
a client has seen finish can always be rated."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from common.errors import InvalidRequestError
from engine.output_processor import SeqDelta
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, TokenLogprob
from store.feedback_store import CompletionRecord

_DONE = object()


@dataclass
class Choice:
    index: int                                   # OpenAI choice index (prompt_index * n + seq index)
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    seq: Sequence | None = None
    last_token_time: float | None = None


class Generation:
    def __init__(self, state, response_id: str, prompts: list[list[int]], params: SamplingParams,
                 api_key_id: str | None):
        self.state = state
        self.response_id = response_id
        self.prompts = prompts
        self.params = params
        self.api_key_id = api_key_id
        self.start = time.monotonic()
        self.created = int(time.time())
        n = params.n
        self.choices = [Choice(p * n + i, p) for p in range(len(prompts)) for i in range(n)]
        self.validate()

    def validate(self) -> None:
        """Reject every prompt that can never be served before anything starts."""
        max_waiting = self.state.engine.max_waiting
        if len(self.prompts) > max_waiting:      # would be a 429 forever: it can never fit
            raise InvalidRequestError(f"{len(self.prompts)} prompts in one request; this server queues at most "
                                      f"{max_waiting} requests (max_waiting)", param="prompt")
        limit = self.state.config.max_prompt_tokens
        for prompt in self.prompts:
            if limit is not None and len(prompt) > limit:
                raise InvalidRequestError(
                    f"the prompt has {len(prompt)} tokens; this server accepts at most {limit}",
                    param="messages", code="context_length_exceeded")
            self.state.llm.validate_request(prompt, self.params)

    # -- running -----------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[tuple[Choice, SeqDelta]]:
        """(choice, delta) pairs from all prompts as they come; closing it aborts what still runs."""
        self.state.engine.check_capacity(len(self.prompts))   # all prompts or none (429)
        gens = [self._one(i, p) for i, p in enumerate(self.prompts)]
        async with aclosing(_merge(gens)) as merged:
            async for item in merged:
                yield item

    async def run(self) -> list[Choice]:
        async with aclosing(self.stream()) as items:
            async for _ in items:
                pass
        return self.choices

    async def _one(self, prompt_index: int, prompt: list[int]) -> AsyncIterator[tuple[Choice, SeqDelta]]:
        rid = self.response_id if len(self.prompts) == 1 else f"{self.response_id}-{prompt_index}"
        gen = self.state.engine.generate(rid, prompt, self.params,
                                         first_choice=(self.response_id, prompt_index * self.params.n))
        counted = False
        async with aclosing(gen):
            async for delta in gen:
                if not counted:
                    self.state.metrics.prompt_tokens.inc(len(prompt))
                    counted = True
                choice = self.choices[prompt_index * self.params.n + delta.index]
                await self._absorb(choice, delta)
                yield choice, delta

    async def _absorb(self, choice: Choice, delta: SeqDelta) -> None:
        m, now = self.state.metrics, time.monotonic()
        if delta.token_ids:
            m.generation_tokens.inc(len(delta.token_ids))
            if choice.last_token_time is None:
                m.ttft.observe(now - self.start)
            else:
                m.itl.observe(now - choice.last_token_time)
            choice.last_token_time = now
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        choice.logprobs.extend(delta.logprobs)
        if delta.finished:
            choice.finish_reason, choice.seq = delta.finish_reason, delta.seq
            await self._record(choice)
            m.e2e.observe(now - self.start)
            m.finished(delta.finish_reason)
            seq = delta.seq
            if seq is not None and seq.first_scheduled_time is not None:
                m.queue_time.observe(max(0.0, seq.first_scheduled_time - seq.arrival_time))

    async def _record(self, choice: Choice) -> None:
        seq = choice.seq
        if seq is None:
            return
        rec = CompletionRecord(
            response_id=self.response_id, choice_index=choice.index,
            prompt_token_ids=list(seq.prompt_token_ids), response_token_ids=list(seq.output_token_ids),
            logprobs=list(seq.logprobs), adapter_version=seq.adapter_version,
            adapter_versions=tuple(seq.adapter_versions),
            api_key_id=self.api_key_id, created=time.time(), finish_reason=choice.finish_reason,
            model=self.state.model_name)
        await asyncio.to_thread(self.state.store.record_completions, [rec])

    # -- results -----------------------------------------------------------------------
    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.seq.output_token_ids) if c.seq is not None else len(c.token_ids)
                         for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


async def _merge(gens: list) -> AsyncIterator:
    """Interleave async generators; an error in one stops all; closing stops all."""
    if len(gens) == 1:
        async with aclosing(gens[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen) -> None:
        try:
            async with aclosing(gen):
                async for item in gen:
                    await queue.put(item)
            await queue.put(_DONE)
        except Exception as exc:              # noqa: BLE001 -- handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
