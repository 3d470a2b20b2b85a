"""Concurrency and backpressure on a real uvicorn server with the tiny random-weight model:
64 concurrent streaming clients are batched; a full queue is a 429 with Retry-After; long prompts
are a 400 context_length_exceeded; nothing hangs."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from server.app import create_app
from server.testing import ServerThread, tiny_state


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    state = tiny_state(tiny_model, tmp_path_factory.mktemp("load") / "alchemist.db")
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


def test_64_concurrent_streaming_clients_are_batched(server):
    state = server.state
    peak = {"running": 0}

    def hook():                                  # engine thread, between steps
        peak["running"] = max(peak["running"], len(state.llm.scheduler.running))
    state.engine.step_hooks.append(hook)

    async def one(client: AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=state.model_name, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=8, temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def main():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))
    try:
        results = asyncio.run(main())
    finally:
        state.engine.step_hooks.remove(hook)
    assert [finish for _, finish, _ in results] == ["length"] * 64
    assert [tokens for _, _, tokens in results] == [8] * 64
    assert peak["running"] > 8, peak             # batched together, not one after another
    stats = state.llm.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_full_queue_is_429_with_retry_after(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db", max_waiting=1)
    state.llm.scheduler.config.max_num_seqs = 1                 # one request runs, the next one waits
    state.engine.step_hooks.append(lambda: time.sleep(0.01))   # keep the first request running
    with ServerThread(create_app(state)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        body = {"prompt": [1, 2, 3], "max_tokens": 900, "ignore_eos": True, "stream": True}
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(
            client.completions.create(model=state.model_name, prompt="hi", max_tokens=2)))
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()                    # keep it: dropping it would close the stream
            assert next(lines).startswith("data:")
            waiter.start()                            # waits to be scheduled: the queue (1) is full
            deadline = time.monotonic() + 10
            while state.engine.num_waiting() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=state.model_name, prompt="hello", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["type"] == "rate_limit_error"
        waiter.join(timeout=30)                       # the stream's client left: the waiting one ran
        assert queued and queued[0].choices[0].finish_reason in ("stop", "length")
        deadline = time.monotonic() + 10            # the stream's client left: its slot frees up
        while state.engine.num_pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        ok = client.completions.create(model=state.model_name, prompt="hello", max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_prompt_limit_is_400_context_length_exceeded(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db", max_prompt_tokens=16)
    with ServerThread(create_app(state)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=state.model_name, prompt=list(range(100, 117)), max_tokens=2)
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as e:      # tiny model: 1024 positions
            client.completions.create(model=state.model_name, prompt=[5] * 8, max_tokens=2000)
        assert e.value.body["code"] == "context_length_exceeded"
        assert client.completions.create(model=state.model_name, prompt=list(range(100, 116)),
                                         max_tokens=2).usage.prompt_tokens == 16
