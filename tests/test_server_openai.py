"""The OpenAI-compatible API on a real uvicorn server with the real SmolLM2-135M-Instruct on CPU,
driven by the official `openai` client (sync and async) and raw httpx."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.embedded_model import DEFAULT_MODEL_NAME, ensure_default_model
from server.app import create_app
from server.auth import key_identity
from server.config import ServerConfig
from server.state import ServerState
from server.testing import ServerThread

pytestmark = pytest.mark.slow
KEY = "sk-test-openai"
HI = [{"role": "user", "content": "Say hi to me in one short sentence."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("alchemist")
    engine = EngineConfig(model=str(ensure_default_model()), device="cpu", kv_cache_bytes=256 << 20)
    state = ServerState.build(ServerConfig(api_keys=[KEY], db_path=str(home / "alchemist.db"), engine=engine))
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy answer to HI (16 tokens), shared by the tests that compare against it."""
    return client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=16,
                                          temperature=0)


def wait_idle(state, timeout: float = 15.0) -> float:
    """Seconds until the engine runs nothing and every KV block is free."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        s = state.llm.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0 and not state.engine.num_pending():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"engine still busy after {timeout}s: {state.llm.stats()}")


def test_chat_non_streaming_is_recorded(server, greedy):
    r = greedy
    assert r.id.startswith("chatcmpl-") and len(r.id) > 20
    assert r.object == "chat.completion" and r.model == DEFAULT_MODEL_NAME and r.created > 0
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    rec = server.state.store.get_completion(r.id, 0)
    assert rec is not None and rec.api_key_id == key_identity(KEY) and rec.model == DEFAULT_MODEL_NAME
    assert len(rec.prompt_token_ids) == u.prompt_tokens
    assert len(rec.response_token_ids) == len(rec.logprobs) == u.completion_tokens
    assert all(lp <= 0.0 for lp in rec.logprobs) and rec.finish_reason == choice.finish_reason
    assert rec.adapter_version == 0 and rec.adapter_versions == ((0, 0),) and abs(rec.created - time.time()) < 120


def test_streaming_equals_greedy_and_reports_usage(client, greedy):
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [greedy.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == greedy.usage.completion_tokens
    assert last.usage.prompt_tokens == greedy.usage.prompt_tokens


def test_content_parts_and_system_message(server, client, greedy):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say hi to me "},
                                          {"type": "text", "text": "in one short sentence."}]}]
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=parts, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == greedy.choices[0].message.content
    sys_msgs = [{"role": "system", "content": "You are a pirate."}] + HI
    r2 = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=sys_msgs, max_tokens=4, temperature=0)
    prompt = server.state.store.get_completion(r2.id, 0).prompt_token_ids
    assert "You are a pirate." in server.state.tokenizer.decode(prompt)


def test_n2_records_both_choices(server, client):
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=8, n=2,
                                       temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(server.state.store.get_completion(r.id, i).response_token_ids)
                                            for i in range(2))
    assert server.state.store.num_choices(r.id) == 2
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=8, n=2,
                                            temperature=1.0, seed=7, stream=True)
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in stream
                if c.choices and c.choices[0].finish_reason}
    assert finishes == {0: r.choices[0].finish_reason, 1: r.choices[1].finish_reason}


def test_stop_string(client, greedy):
    words = greedy.choices[0].message.content.split()
    assert len(words) >= 3, greedy.choices[0].message.content
    stop = " " + words[2]
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=16,
                                       temperature=0, stop=[stop, "zzzz-never"])
    text = greedy.choices[0].message.content
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_and_top_logprobs(server, client, greedy):
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content == greedy.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0.0
        assert t.top_logprobs[0].token == t.token                      # greedy picks the best
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8") == t.token
    rec = server.state.store.get_completion(r.id, 0)
    assert rec.logprobs == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=16,
                                            temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_seed_reproducible_at_temperature_1(client):
    def run(seed):
        return client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=12,
                                              temperature=1.0, seed=seed).choices[0].message.content
    assert run(1234) == run(1234)


def test_length_and_extras(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_completion_tokens=2,
                                       temperature=0.7, top_p=0.9, presence_penalty=0.5,
                                       frequency_penalty=0.5, user="u-1",
                                       extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_errors_map_to_client_exceptions(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=HI, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=2,
                                       messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=HI, n=99)
    assert e.value.body["param"] == "n"


def test_malformed_and_odd_bodies_are_400_never_500(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = ['{"messages": [', "[]", "null", "", '"text"', '{"messages": []}',
              '{"messages": [{"role": "bob", "content": "x"}]}',
              '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
              '{"messages": [{"role": "user", "content": 5}]}',
              '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
              '{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
              '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": true}',
              '{"messages": [{"role": "user", "content": "x"}], "stop": [""]}',
              '{"messages": [{"role": "user", "content": "x"}], "seed": 1e30}',
              '{"messages": [{"role": "user", "content": "x"}], "stream_options": 3}',
              '{"messages": [{"role": "user", "content": "x"}], "top_k": 1180591620717411303424}']
    with httpx.Client(base_url=server.url, headers=h, timeout=30) as http:
        for body in bodies:
            r = http.post("/v1/chat/completions", content=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"], body
        r = http.post("/v1/chat/completions", content='{"messages": [')
        assert "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", content='{"messages": [{"role": "bob", "content": "x"}]}')
        assert r.json()["error"]["param"] == "messages.0.role"
        for path, body in (("/v1/completions", '{"prompt": []}'), ("/v1/completions", '{"prompt": [-5]}'),
                           ("/v1/completions", '{"prompt": [[]]}'), ("/v1/completions", '{"prompt": [99999999]}'),
                           ("/tokenize", "{}"), ("/detokenize", '{"tokens": [99999999]}'),
                           ("/detokenize", '{"tokens": "abc"}'), ("/v1/completions", '{"prompt": "x", "echo": true}')):
            r = http.post(path, content=body)
            assert r.status_code == 400, (path, body, r.text)
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/chat/completions").json()["error"]["type"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}     # the engine survived it all


def test_completions_models_tokenize(server, client, greedy):
    r = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=["Once upon a time", "The sky is"],
                                  max_tokens=4, temperature=0, logprobs=2)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1] and all(c.text for c in r.choices)
    assert len(r.choices[0].logprobs.tokens) == 4 and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    assert server.state.store.num_choices(r.id) == 2
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    toks = http.post("/tokenize", json={"model": DEFAULT_MODEL_NAME, "prompt": "Once upon a time"}).json()
    assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 8192
    ids = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=toks["tokens"], max_tokens=4, temperature=0)
    assert ids.choices[0].text == r.choices[0].text
    stream = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="Once upon a time", max_tokens=4,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    back = http.post("/detokenize", json={"tokens": toks["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}
    chat_toks = http.post("/tokenize", json={"messages": HI}).json()
    assert chat_toks["count"] == greedy.usage.prompt_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL_NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_stream_disconnect_frees_blocks(server):
    state = server.state
    body = {"model": DEFAULT_MODEL_NAME, "messages": HI, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    start = time.monotonic()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            next(line for line in lines if line.startswith("data:"))
            assert state.llm.stats().num_running == 1 and state.llm.stats().kv_cache_usage > 0
    response_id = json.loads(first[5:])["id"]
    wait_idle(state)
    assert time.monotonic() - start < 15                     # 400 tokens would take far longer
    assert state.store.num_choices(response_id) == 0        # aborted choices are not recorded


def test_non_streaming_disconnect_frees_blocks(server):
    state = server.state
    body = {"model": DEFAULT_MODEL_NAME, "messages": HI, "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_idle(state)


METRIC_NAMES = [
    "alchemist_num_requests_running", "alchemist_num_requests_waiting", "alchemist_kv_cache_usage_perc",
    "alchemist_prompt_tokens_total", "alchemist_generation_tokens_total", "alchemist_request_success_total",
    "alchemist_time_to_first_token_seconds_bucket", "alchemist_inter_token_latency_seconds_bucket",
    "alchemist_e2e_request_latency_seconds_bucket", "alchemist_request_queue_time_seconds_bucket",
    "alchemist_num_preemptions_total", "alchemist_prefix_cache_queries_total",
    "alchemist_prefix_cache_hits_total", "alchemist_feedback_total", "alchemist_device_memory_bytes",
    "process_resident_memory_bytes"]


def test_metrics_scrape_parses_and_has_every_name(server, greedy):
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    missing = [n for n in METRIC_NAMES if n not in samples]
    assert not missing, missing
    def value(name, **labels):
        return sum(s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items()))
    assert all(s.labels["model_name"] == DEFAULT_MODEL_NAME for s in samples["alchemist_prompt_tokens_total"])
    assert value("alchemist_prompt_tokens_total") >= greedy.usage.prompt_tokens
    assert value("alchemist_generation_tokens_total") >= greedy.usage.completion_tokens
    assert value("alchemist_request_success_total", finished_reason="length") >= 1
    assert value("alchemist_time_to_first_token_seconds_count") >= 1
    assert value("alchemist_request_queue_time_seconds_count") >= 1
    assert value("alchemist_prefix_cache_hits_total") > 0                       # HI was repeated
    assert 0.0 <= value("alchemist_kv_cache_usage_perc") <= 1.0
    assert {s.labels["kind"] for s in samples["alchemist_device_memory_bytes"]} == {"allocated", "reserved"}
    assert {(s.labels["kind"], s.labels["value"]) for s in samples["alchemist_feedback_total"]} >= {
        ("thumbs", "1"), ("thumbs", "-1"), ("stars", "5")}
