"""POST /feedback over HTTP on a real uvicorn server (tiny random model, context 1024 tokens), issue 15:
a better_response the trainer could never train is a 400 and is not stored; `reward`, the third
form of a rating beside thumbs and stars (stored, returned, counted in a bounded metric label)."""
from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.testing import ServerThread, tiny_state
from tests.test_server_training import TRAINING, chat, client
from trainer.config import TrainerConfig

USER = "sk-limits-user"
STEP_TOKENS = 512                     # under the tiny model's context (1024): the tighter of the two limits


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("limits")
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", api_keys=[USER],
                       training=TrainerConfig(**TRAINING, step_tokens=STEP_TOKENS))
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


def error_of(r: httpx.Response, status_code: int) -> dict:
    assert r.status_code == status_code, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def metric(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


@pytest.mark.parametrize("text, limit", [("b" * 16384, "of 512 tokens"), ("hello " * 600, "of 512 tokens")])
def test_an_untrainable_better_response_is_a_400_and_not_stored(server, text, limit):
    """"b" * 16384 (8,192 tokens, within the 16 KiB text limit) once crashed the trainer for everyone."""
    with client(server.url, USER) as user:
        rid = chat(user)
        before = server.state.store.count_feedback()
        err = error_of(user.post("/feedback", json={"id": rid, "rating": 1, "better_response": text}), 400)
        assert err["param"] == "better_response" and err["type"] == "invalid_request_error"
        assert limit in err["message"] and "training.step_tokens" in err["message"]
        assert server.state.store.count_feedback() == before
        ok = user.post("/feedback", json={"id": rid, "rating": 1, "better_response": "hello " * 100})
        assert ok.status_code == 201, ok.text


def test_a_better_response_over_the_context_names_the_context(tiny_model, tmp_path):
    """With step_tokens above the context, the context is the limit the message names."""
    state = tiny_state(tiny_model, tmp_path / "a.db", run_dir=tmp_path / "run",
                       training=TrainerConfig(**TRAINING, step_tokens=4096))
    with ServerThread(create_app(state)) as srv, client(srv.url, None) as anon:
        rid = chat(anon)
        err = error_of(anon.post("/feedback", json={"id": rid, "stars": 5, "better_response": "b" * 16384}), 400)
        assert err["param"] == "better_response" and "max_model_len) of 1024 tokens" in err["message"]
        assert state.store.count_feedback() == 0


def test_a_reward_is_a_third_form_of_rating(server):
    with client(server.url, USER) as user:
        rid = chat(user)
        before = metric(server.url, "alchemist_feedback_total", kind="reward", value="0.5..1")
        r = user.post("/feedback", json={"id": rid, "reward": 0.75})
        assert r.status_code == 201, r.text
        got = user.get(f"/feedback/{r.json()['feedback_id']}").json()
        assert (got["reward"], got["rating"], got["stars"]) == (0.75, None, None)
        assert metric(server.url, "alchemist_feedback_total", kind="reward", value="0.5..1") == before + 1
        again = user.post("/feedback", json={"id": rid, "reward": -1, "replace": True})
        assert again.status_code == 200 and user.get(f"/feedback/{r.json()['feedback_id']}").json()["reward"] == -1
        assert metric(server.url, "alchemist_feedback_total", kind="reward", value="-1..-0.5") >= 1


@pytest.mark.parametrize("raw, param", [
    ('"reward": 1.5', "reward"), ('"reward": -1.01', "reward"), ('"reward": NaN', "reward"),
    ('"reward": Infinity', "reward"), ('"reward": true', "reward"), ('"reward": "0.5"', "reward"),
    ('"reward": 0.5, "rating": 1', "rating"), ('"reward": 0.5, "stars": 3', "rating"),
])
def test_an_invalid_reward_is_a_400(server, raw, param):
    with client(server.url, USER) as user:
        rid = chat(user)
        body = "{" + f'"id": {json.dumps(rid)}, {raw}' + "}"
        err = error_of(user.post("/feedback", content=body, headers={"Content-Type": "application/json"}), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error", err
