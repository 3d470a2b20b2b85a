"""The quarantine over HTTP on a real uvicorn server (tiny random model), issue 15: a rating whose
training step fails is quarantined (its status, the admin listing, the status endpoint, the metric) while
the next good rating trains, also across a restart; the admin quarantine API (list, retry, drop; admin
key; 404s)."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.app import create_app
from server.testing import ServerThread, tiny_state
from tests.test_server_feedback_limits import STEP_TOKENS, error_of, metric
from tests.test_server_training import TRAINING, chat, client, rate, status, wait_for
from trainer import online
from trainer.config import TrainerConfig

USER, ADMIN = "sk-quarantine-user", "sk-quarantine-admin"


def start(tiny_model: Path, home: Path) -> ServerThread:
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", api_keys=[USER],
                       admin_api_keys=[ADMIN], training=TrainerConfig(**TRAINING, step_tokens=STEP_TOKENS))
    server = ServerThread(create_app(state)).start()
    server.state = state
    return server


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = start(tiny_model, tmp_path_factory.mktemp("quarantine"))
    yield srv
    srv.stop()


def poison(monkeypatch, response_ids: set[str]) -> None:
    """A training step raises whenever a record of these completions is in it (the probe step runs)."""
    real = online.forward_backward

    def forward_backward(model, records, *args, **kwargs):
        if any(r.key is not None and r.key[0] in response_ids for r in records):
            raise IndexError("index 8192 is out of bounds for dimension 0 with size 8192")
        return real(model, records, *args, **kwargs)
    monkeypatch.setattr(online, "forward_backward", forward_backward)


def rate_and_wait(user, rid: str, until: str) -> str:
    fid = rate(user, rid)
    wait_for(lambda: user.get(f"/feedback/{fid}").json()["status"] == until, what=f"feedback {until}")
    return fid


def test_a_poisoned_rating_is_quarantined_and_training_goes_on_across_a_restart(tiny_model, tmp_path, monkeypatch):
    server = start(tiny_model, tmp_path)
    try:
        with client(server.url, USER) as user, client(server.url, ADMIN) as admin:
            poisoned = [chat(user), chat(user)]
            poison(monkeypatch, set(poisoned))
            fids = [rate_and_wait(user, rid, "quarantined") for rid in poisoned]
            good = rate_and_wait(user, chat(user), "trained")          # checkpoint_every=1
            s = status(admin)
            assert not s["paused"] and s["last_error"] is None and s["quarantined_feedback"] == 2
            assert s["quarantine"]["since_start"] == {"error": 2}
            listing = admin.get("/v1/training/quarantine").json()
            assert listing["total"] == 2 and [q["feedback_id"] for q in listing["data"]] == fids[::-1]
            first = listing["data"][-1]
            assert (first["id"], first["choice_index"], first["reason"]) == (poisoned[0], 0, "error")
            assert first["error"].startswith("IndexError: index 8192") and first["quarantined_at"] > 0
            assert metric(server.url, "alchemist_train_quarantined_total", reason="error") == 2
            assert metric(server.url, "alchemist_train_quarantined_total", reason="oom") == 0
            assert metric(server.url, "alchemist_feedback_quarantined") == 2
            dropped = admin.delete(f"/v1/training/quarantine/{fids[1]}")
            assert dropped.status_code == 200 and dropped.json()["status"] == "dropped"
            assert user.get(f"/feedback/{fids[1]}").json()["status"] == "dropped"
    finally:
        server.stop()                                    # closes the ServerState: a final checkpoint
    monkeypatch.undo()                                   # the fault is gone; the quarantine stays
    server = start(tiny_model, tmp_path)
    try:
        with client(server.url, USER) as user, client(server.url, ADMIN) as admin:
            assert user.get(f"/feedback/{fids[0]}").json()["status"] == "quarantined"
            assert user.get(f"/feedback/{good}").json()["status"] == "trained"
            steps = status(admin)["steps"]
            rate_and_wait(user, chat(user), "trained")                  # the next good rating trains
            s = status(admin)
            assert s["steps"] == steps + 1 and s["quarantined_feedback"] == 1 and s["pending_feedback"] == 0
            retried = admin.post(f"/v1/training/quarantine/{fids[0]}/retry")
            assert retried.status_code == 200 and retried.json()["status"] == "pending"
            wait_for(lambda: user.get(f"/feedback/{fids[0]}").json()["status"] == "trained", what="the retry")
            assert admin.get("/v1/training/quarantine").json() == {"object": "list", "total": 0, "data": []}
            for method in ("DELETE", "POST"):
                path = f"/v1/training/quarantine/{fids[0]}" + ("/retry" if method == "POST" else "")
                assert error_of(admin.request(method, path), 404)["type"] == "not_found_error"
    finally:
        server.stop()


def test_the_quarantine_api_needs_an_admin_key_and_404s_unknown_ids(server):
    calls = [("GET", "/v1/training/quarantine"), ("POST", "/v1/training/quarantine/fb-x/retry"),
             ("DELETE", "/v1/training/quarantine/fb-x")]
    with client(server.url, None) as anon, client(server.url, USER) as user, client(server.url, ADMIN) as admin:
        for method, path in calls:
            assert error_of(anon.request(method, path), 401)["type"] == "authentication_error"
            assert error_of(user.request(method, path), 403)["type"] == "permission_error"
        assert admin.get("/v1/training/quarantine").status_code == 200
        for method, path in calls[1:]:
            err = error_of(admin.request(method, path), 404)
            assert err["type"] == "not_found_error" and err["param"] == "feedback_id"
        for bad in ("0", "1001", "x"):
            assert error_of(admin.get(f"/v1/training/quarantine?limit={bad}"), 400)["param"] == "limit"
