"""Inputs that used to crash or wedge: a lone UTF-16 surrogate in any string field is a 400 naming the
field (nothing stored, the keep-alive connection still usable), and `max_waiting` bounds the requests
waiting to be scheduled, not the ones running; a /v1/completions call with more prompts than it can
ever queue is a 400, not a 429 forever."""
from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.testing import ServerThread, tiny_state

KEY = "sk-inputs"
S = "\ud800"                                             # json.dumps writes it as the escape \ud800
CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("inputs") / "alchemist.db"
    state = tiny_state(tiny_model, db, api_keys=[KEY])
    with ServerThread(create_app(state)) as srv:
        srv.state, srv.db = state, db
        yield srv


def _surrogate_cases(rid: str) -> list[tuple[str, dict, str]]:
    """(path, body, the param the 400 must name): every string input of every request body."""
    return [
        (CHAT, {"messages": [{"role": "user", "content": S}]}, "messages.0.content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" + S}]}]},
         "messages.0.content.0.text"),
        (CHAT, {"model": S, "messages": [USER]}, "model"),
        (CHAT, {"messages": [USER, {"role": "user", "content": "x", "name": S}]}, "messages.1.name"),
        (CHAT, {"messages": [USER], "stop": ["ok", S]}, "stop.1"),
        (CHAT, {"messages": [USER], "user": "é" + S}, "user"),
        ("/v1/completions", {"prompt": S}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", S]}, "prompt.1"),
        ("/v1/completions", {"model": S, "prompt": "hi"}, "model"),
        ("/tokenize", {"prompt": S}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": S}]}, "messages.0.content"),
        ("/detokenize", {"model": S, "tokens": [1, 2]}, "model"),
        ("/feedback", {"id": rid + S, "rating": 1}, "id"),
        ("/feedback", {"id": rid, "rating": 1, "comment": S}, "comment"),
        ("/v1/feedback", {"id": rid, "rating": 1, "better_response": S}, "better_response"),
    ]


def _rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


def test_a_lone_surrogate_is_400_naming_the_field_on_a_connection_that_stays(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", CHAT, body=json.dumps({"messages": [USER], "max_tokens": 2}), headers=auth)
    rid = json.loads(conn.getresponse().read())["id"]
    sock = conn.sock
    before = _rows(server.db)
    cases = _surrogate_cases(rid)
    assert len(cases) >= 14
    for path, body, param in cases:
        raw = json.dumps(body)
        assert "\\ud800" in raw
        conn.request("POST", path, body=raw.encode(), headers=auth)
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 400, (path, param, answer)
        assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
        assert response.getheader("connection") != "close"
        conn.request("GET", "/health")                    # the same keep-alive connection goes on
        assert conn.getresponse().read() and conn.sock is sock
    assert _rows(server.db) == before                     # nothing stored


def test_a_valid_surrogate_pair_is_text(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        r = c.post("/tokenize", content=json.dumps({"prompt": "\ud83c\udf89 party"}).encode())
        assert r.status_code == 200 and r.json()["count"] > 1


@pytest.fixture
def one_at_a_time(tiny_model, tmp_path):
    """max_waiting=1, one running sequence at most, slow steps: queueing is easy to watch."""
    state = tiny_state(tiny_model, tmp_path / "a.db", max_waiting=1)
    state.llm.scheduler.config.max_num_seqs = 1
    state.engine.step_hooks.append(lambda: time.sleep(0.01))
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


def test_more_prompts_than_max_waiting_is_400_not_429(one_at_a_time):
    r = httpx.post(one_at_a_time.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "max_waiting" in r.json()["error"]["message"]


def test_max_waiting_counts_waiting_requests_not_running_ones(one_at_a_time):
    srv, engine = one_at_a_time, one_at_a_time.state.engine
    body = {"prompt": [1, 2, 3], "max_tokens": 600, "ignore_eos": True, "stream": True}
    short = {"prompt": [4, 5, 6], "max_tokens": 2}
    results = {}
    with httpx.Client(base_url=srv.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                           json=body) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        assert next(lines).startswith("data:")            # request A runs; nothing waits
        assert engine.num_waiting() == 0 and engine.num_pending() == 1

        def queued():                                     # request B waits for A's sequence slot
            results["b"] = httpx.post(srv.url + "/v1/completions", json=short, timeout=60)
        waiter = threading.Thread(target=queued)
        waiter.start()
        deadline = time.monotonic() + 10
        while engine.num_waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_waiting() == 1 and "b" not in results   # accepted, waiting (was a 429)
        third = httpx.post(srv.url + "/v1/completions", json=short, timeout=30)
        assert third.status_code == 429 and third.headers["retry-after"] == "1"   # the queue is full
    waiter.join(timeout=60)                               # A's client left: B is scheduled
    assert results["b"].status_code == 200, results["b"].text
