"""POST/GET /feedback over HTTP on a real uvicorn server (tiny random-weight model, two API keys),
and durability: a 2xx'd rating survives kill -9 of an `alchemist serve` subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.auth import key_identity
from server.testing import ServerThread, free_port, serve_process, tiny_state

ROOT = Path(__file__).resolve().parent.parent
K1, K2 = "sk-feedback-one", "sk-feedback-two"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("feedback") / "alchemist.db"
    state = tiny_state(tiny_model, db, api_keys=[K1, K2])
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {K1}"}, timeout=30) as c:
        yield c


def complete(http: httpx.Client, n: int = 1) -> str:
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "n": n})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_thumbs_then_get_on_both_paths(server, http):
    rid = complete(http, n=2)
    r = http.post("/feedback", json={"id": rid, "choice_index": 1, "rating": -1})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == rid and body["choice_index"] == 1 and body["status"] == "pending"
    assert body["feedback_id"].startswith("fb-")
    for path in (f"/feedback/{body['feedback_id']}", f"/v1/feedback/{body['feedback_id']}"):
        got = http.get(path)
        assert got.status_code == 200
        assert got.json()["rating"] == -1 and got.json()["stars"] is None and got.json()["id"] == rid
    stored = server.state.store.get_feedback(body["feedback_id"], key_identity(K1))
    assert stored.rating == -1 and stored.choice_index == 1


def test_stars_with_comment_and_better_response(http):
    rid = complete(http)
    r = http.post("/v1/feedback", json={"id": rid, "choice_index": 0, "stars": 5, "comment": "great",
                                        "better_response": "Hello!"})
    assert r.status_code == 201, r.text
    got = http.get(f"/v1/feedback/{r.json()['feedback_id']}").json()
    assert (got["stars"], got["rating"], got["comment"], got["better_response"]) == (5, None, "great", "Hello!")


def test_duplicate_is_409_and_replace_is_200(http):
    rid = complete(http)
    first = http.post("/feedback", json={"id": rid, "rating": 1})
    assert first.status_code == 201
    err = error_of(http.post("/feedback", json={"id": rid, "rating": -1}), 409)
    assert err["type"] == "conflict_error"
    again = http.post("/feedback", json={"id": rid, "stars": 2, "replace": True})
    assert again.status_code == 200 and again.json()["feedback_id"] == first.json()["feedback_id"]
    got = http.get(f"/feedback/{first.json()['feedback_id']}").json()
    assert got["stars"] == 2 and got["rating"] is None


def test_unknown_and_foreign_ids_are_the_same_404(server, http):
    rid = complete(http)
    unknown = error_of(http.post("/feedback", json={"id": "chatcmpl-doesnotexist", "rating": 1}), 404)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {K2}"}) as other:
        foreign = error_of(other.post("/feedback", json={"id": rid, "rating": 1}), 404)
        assert foreign["message"] == unknown["message"].replace("chatcmpl-doesnotexist", rid)
        assert foreign["type"] == unknown["type"] == "not_found_error"
        fb = http.post("/feedback", json={"id": rid, "rating": 1}).json()["feedback_id"]
        error_of(other.get(f"/feedback/{fb}"), 404)
    error_of(http.get("/feedback/fb-nope"), 404)


@pytest.mark.parametrize("body, param", [
    ({"choice_index": 2, "rating": 1}, "choice_index"),
    ({"choice_index": -1, "rating": 1}, "choice_index"),
    ({"rating": 1, "stars": 5}, "rating"),
    ({}, "rating"),
    ({"rating": 0}, "rating"),
    ({"rating": 2}, "rating"),
    ({"stars": 0}, "stars"),
    ({"stars": 6}, "stars"),
    ({"rating": "1"}, "rating"),
    ({"rating": True}, "rating"),
    ({"rating": 1.0}, "rating"),
    ({"stars": 3, "comment": "x" * 20000}, "comment"),
    ({"stars": 3, "better_response": 7}, "better_response"),
    ({"stars": 3, "choice_index": "0"}, "choice_index"),
    ({"stars": 3, "replace": "yes"}, "replace"),
])
def test_invalid_feedback_is_400(http, body, param):
    rid = complete(http, n=2)
    err = error_of(http.post("/feedback", json={"id": rid, **body}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize("raw", ['{"id": "x", "rating": 1', "", "[1, 2]", "null", '{"rating": 1}',
                                 '{"id": 5, "rating": 1}', "not json at all"])
def test_malformed_feedback_body_is_400(http, raw):
    err = error_of(http.post("/feedback", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"


def test_rating_right_after_the_finish_chunk(http):
    """The completion is recorded before its final chunk: rate it while the stream is still open."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                fb = http.post("/feedback", json={"id": chunk["id"], "rating": 1})
                assert fb.status_code == 201, fb.text
                break
        else:
            pytest.fail("no finish chunk")


def test_api_key_rules(server):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        for method, path in (("POST", "/feedback"), ("POST", "/v1/feedback"), ("GET", "/feedback/fb-x"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize")):
            err = error_of(anon.request(method, path, content="{not json"), 401)
            assert err["type"] == "authentication_error"
            error_of(anon.request(method, path, json={}, headers={"Authorization": "Bearer wrong"}), 401)
            error_of(anon.request(method, path, json={}, headers={"Authorization": K1}), 401)
        assert anon.get("/health").json() == {"status": "ok"}
        assert anon.get("/metrics").status_code == 200
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {K2}"}).status_code == 200


def test_feedback_counter(server, http):
    rid = complete(http)
    assert http.post("/feedback", json={"id": rid, "stars": 4}).status_code == 201
    text = httpx.get(server.url + "/metrics").text
    values = {(s.labels["kind"], s.labels["value"]): s.value
              for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "alchemist_feedback_total"}
    assert values[("stars", "4")] >= 1 and values[("thumbs", "-1")] >= 1


# -- durability ------------------------------------------------------------------------
def _serve(cmd: list[str], env: dict, log: Path, url: str) -> subprocess.Popen:
    return serve_process(cmd, env, log, url, cwd=ROOT)


def test_feedback_survives_kill_9_and_restart(tiny_model, tmp_path):
    home, port = tmp_path / "home", free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"db_path": str(home / "feedback.db"), "retention_days": 7,
                                  "engine": {"device": "cpu", "kv_cache_bytes": 16 << 20}}))
    env = {**os.environ, "ALCHEMIST_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ALCHEMIST_API_KEYS", None)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--model", str(tiny_model), "--log-level", "info"]
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    proc = _serve(cmd, env, log, url)
    try:
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        rid = r.json()["id"]
        fb = httpx.post(url + "/feedback", json={"id": rid, "rating": 1, "comment": "keep me"}, timeout=30)
        assert fb.status_code == 201, fb.text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc = _serve(cmd, env, log, url)
    try:
        got = httpx.get(f"{url}/feedback/{fb.json()['feedback_id']}", timeout=30)
        assert got.status_code == 200 and got.json()["rating"] == 1 and got.json()["comment"] == "keep me"
        dup = httpx.post(url + "/feedback", json={"id": rid, "rating": -1}, timeout=30)
        assert dup.status_code == 409
    finally:
        proc.send_signal(signal.SIGTERM)                 # uvicorn re-raises it after a clean shutdown
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert log.read_text().count("Application shutdown complete") == 1    # lifespan ran once: not after -9
