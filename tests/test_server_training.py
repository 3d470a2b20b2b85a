"""Online training over HTTP on a real uvicorn server (tiny random model): feedback -> a step ->
a new adapter version served and recorded; admin API and its auth; rollback; pause/resume; metrics;
kill -9 of `alchemist serve` during training, then restart (nothing lost, nothing trained twice);
`alchemist export-adapter`."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.errors import ConfigError
from server.app import create_app
from server.testing import ServerThread, free_port, serve_process, tiny_state
from trainer.adapters import load_peft
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent
USER, ADMIN = "sk-train-user", "sk-train-admin"
TRAINING = dict(lora_rank=4, lora_alpha=8.0, lr=1e-3, checkpoint_every=1, min_records_per_step=1)
MESSAGE_NUMBERS = itertools.count()
METRICS = ("alchemist_train_steps_total", "alchemist_train_tokens_total", "alchemist_train_step_seconds_count",
           "alchemist_train_loss", "alchemist_adapter_version", "alchemist_feedback_pending",
           "alchemist_activation_reuse_total", "alchemist_activation_pool_bytes",
           "alchemist_train_skipped_steps_total")
LABELS = {"alchemist_activation_reuse_total": ("outcome", {"hit", "stale", "evicted", "too_stale"}),
          "alchemist_activation_pool_bytes": ("tier", {"device", "cpu"}),
          "alchemist_train_tokens_total": ("path", {"reuse", "recompute"}),
          "alchemist_train_skipped_steps_total": ("reason", {"non_finite", "update_capped"})}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("training")
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", api_keys=[USER],
                       admin_api_keys=[ADMIN], training=TrainerConfig(**TRAINING))
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv


def client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


@pytest.fixture()
def user(server):
    with client(server.url, USER) as c:
        yield c


@pytest.fixture()
def admin(server):
    with client(server.url, ADMIN) as c:
        yield c


def chat(http: httpx.Client) -> str:
    """Not captured after the first chat: the template's first blocks come from the prefix cache."""
    text = f"hi there, this is message {next(MESSAGE_NUMBERS)}"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                                                "max_tokens": 4, "temperature": 1.0})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def complete(http: httpx.Client) -> str:
    """/v1/completions with a prompt whose first block is new: captured in prefill, so reusable."""
    text = f"{next(MESSAGE_NUMBERS)} is the number that starts this prompt, long enough for two blocks"
    r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 4, "temperature": 1.0})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def rate(http: httpx.Client, rid: str) -> str:
    r = http.post("/feedback", json={"id": rid, "choice_index": 0, "rating": 1})
    assert r.status_code == 201, r.text
    return r.json()["feedback_id"]


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(admin: httpx.Client) -> dict:
    r = admin.get("/v1/training/status")
    return r.json() if r.status_code == 200 else pytest.fail(r.text)


def train_one(user, admin, serve=chat) -> dict:
    """One rated answer, then wait until it is trained and checkpointed (checkpoint_every=1) and its
    version is live (the engine applies the trainer's offer at its next step boundary)."""
    steps = status(admin)["steps"]
    rate(user, serve(user))
    return wait_for(lambda: (s := status(admin))["steps"] > steps and s["pending_feedback"] == 0
                    and s["adapter_version"] == s["trainer_version"] and s, what="a training step")


def test_admin_endpoints_need_an_admin_key(server):
    calls = [("GET", "/v1/adapters"), ("POST", "/v1/adapters/0/activate"), ("POST", "/v1/training/pause"),
             ("POST", "/v1/training/resume"), ("GET", "/v1/training/status")]
    with client(server.url, None) as anon, client(server.url, USER) as user, client(server.url, ADMIN) as admin:
        for method, path in calls:
            assert anon.request(method, path).status_code == 401, path
            r = user.request(method, path)
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (path, r.text)
            assert admin.request(method, path).status_code == 200, path
        assert admin.post("/v1/adapters/999/activate").json()["error"]["type"] == "not_found_error"
        assert admin.post("/v1/adapters/x/activate").status_code == 400
        assert chat(admin)                                   # an admin key is also an API key


def test_feedback_trains_publishes_and_shows_in_status_and_metrics(server, user, admin):
    s = train_one(user, admin, serve=complete)
    assert s["enabled"] and s["steps"] >= 1 and s["adapter_version"] >= 1
    assert s["totals"]["steps"] >= 1 and math.isfinite(s["last_step"]["loss"]) and s["trained_feedback"] >= 1
    assert s["totals"].get("tokens_reuse", 0) > 0 and s["last_step"]["outcomes"] == {"hit": 1}
    rid = chat(user)
    assert server.state.store.get_completion(rid, 0).adapter_version >= 1
    flat = [x for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text) for x in f.samples]
    samples = {name: [x for x in flat if x.name == name] for name in {x.name for x in flat}}
    assert not [n for n in METRICS if n not in samples], sorted(samples)
    value = {n: {tuple(x.labels.values()): x.value for x in samples[n]} for n in METRICS}
    one = lambda name, *labels: value[name][(server.state.model_name, *labels)]
    assert one("alchemist_adapter_version") >= 1 and one("alchemist_train_steps_total") >= 1
    assert one("alchemist_train_step_seconds_count") >= 1 and one("alchemist_train_tokens_total", "reuse") > 0
    assert one("alchemist_activation_reuse_total", "hit") >= 1 and math.isfinite(one("alchemist_train_loss"))
    for name, (label, values) in LABELS.items():
        assert {x.labels[label] for x in samples[name]} == values, name
    assert all(x.labels["model_name"] == server.state.model_name for n in METRICS for x in samples[n])


def test_each_prompt_of_a_multi_prompt_completion_trains_by_reuse(server, user, admin):
    """/v1/completions with several prompts: choice p*n + i of the answer keys both its feedback and its
    activation record, so a rating of the second prompt's answer trains on that prompt's captured rows."""
    texts = [f"{next(MESSAGE_NUMBERS)} is the number that starts this prompt, long enough for two blocks"
             for _ in range(2)]
    r = user.post("/v1/completions", json={"prompt": texts, "max_tokens": 4, "temperature": 1.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    steps = status(admin)["steps"]
    r = user.post("/feedback", json={"id": body["id"], "choice_index": 1, "rating": 1})
    assert r.status_code == 201, r.text
    s = wait_for(lambda: (s := status(admin))["steps"] > steps and s["pending_feedback"] == 0 and s,
                 what="a training step")
    assert s["last_step"]["outcomes"] == {"hit": 1}
    record = server.state.store.get_completion(body["id"], 1)
    assert record.prompt_token_ids[-3:] == server.state.tokenizer(texts[1]).input_ids[-3:]


def test_a_request_chooses_whether_it_is_captured(server, user):
    """`capture` in a request body (an Alchemist extra): false keeps its activations out of the pool,
    true records them whatever the server's capture_fraction; anything else is a 400."""
    bad = user.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "capture": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text
    ids = {}
    for ask in (False, True):
        text = f"{next(MESSAGE_NUMBERS)} is the number that starts this prompt, long enough for two blocks"
        r = user.post("/v1/completions", json={"prompt": text, "max_tokens": 2, "capture": ask})
        assert r.status_code == 200, r.text
        ids[ask] = r.json()["id"]
    pool = server.state.llm.activation_pool
    assert pool.get((ids[True], 0)) is not None and pool.get((ids[False], 0)) is None


def test_rollback_through_the_admin_api(server, user, admin):
    while status(admin)["adapter_version"] < 2:
        train_one(user, admin)
    latest = status(admin)["adapter_version"]
    listing = admin.get("/v1/adapters").json()
    assert listing["active_version"] == latest and {1, latest} <= {a["version"] for a in listing["data"]}
    r = admin.post("/v1/adapters/1/activate")
    assert (r.status_code, r.json()["active"]) in ((200, True), (202, False)), r.text   # 202: a slow machine
    s = wait_for(lambda: (v := status(admin))["adapter_version"] == 1 and v, what="the rollback")
    assert s["adapter_version"] == 1 == s["trainer_version"]
    assert admin.get("/v1/adapters").json()["active_version"] == 1
    assert server.state.store.get_completion(chat(user), 0).adapter_version == 1
    assert train_one(user, admin)["adapter_version"] == s["next_version"] > latest   # numbers never reused


def test_pause_keeps_ratings_pending_and_resume_trains_them(server, user, admin):
    assert admin.post("/v1/training/pause").json()["paused"]
    steps = status(admin)["steps"]
    fid = rate(user, chat(user))
    time.sleep(1.2)                                           # the hook runs at least every 0.5 s
    s = status(admin)
    assert s["paused"] and s["steps"] == steps and s["pending_feedback"] == 1
    assert user.get(f"/feedback/{fid}").json()["status"] == "pending"
    assert admin.post("/v1/training/resume").json()["paused"] is False
    wait_for(lambda: user.get(f"/feedback/{fid}").json()["status"] == "trained", what="training after resume")
    assert status(admin)["steps"] > steps


def test_trainer_thread_behind_the_http_server(tiny_model, tmp_path):
    """training.concurrency=thread (the default on CUDA) on the CPU: steps on the trainer thread, a version
    goes live at an engine step boundary, rollback, and a final checkpoint at shutdown."""
    state = tiny_state(tiny_model, tmp_path / "a.db", run_dir=tmp_path / "run", api_keys=[USER],
                       admin_api_keys=[ADMIN], training=TrainerConfig(**TRAINING, concurrency="thread"))
    with ServerThread(create_app(state)) as srv, client(srv.url, USER) as user, client(srv.url, ADMIN) as admin:
        assert state.trainer.thread is not None and state.trainer.thread.alive
        for _ in range(2):
            train_one(user, admin, serve=complete)
        s = wait_for(lambda: (v := status(admin))["trainer_version"] == v["adapter_version"] >= 2 and v,
                     what="the newest version live")
        assert s["last_error"] is None and s["totals"].get("tokens_reuse", 0) > 0
        assert state.store.get_completion(chat(user), 0).adapter_version == s["adapter_version"]
        r = admin.post("/v1/adapters/1/activate")
        assert r.status_code == 200 and r.json()["active"], r.text
        assert status(admin)["adapter_version"] == 1
    assert not state.trainer.thread.alive                       # stopped at shutdown, then checkpointed
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-000001"


def test_training_config_admin_keys_and_flags(tmp_path, monkeypatch):
    from server.cli import _config, _parser
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"admin_api_keys": ["a-file"], "training": {"objective": "kto", "run_name": "x"}}))
    monkeypatch.setenv("ALCHEMIST_ADMIN_KEYS", "a-env")
    monkeypatch.setenv("ALCHEMIST_HOME", str(tmp_path))
    args = ["serve", "--config", str(path), "--admin-api-key", "a-flag"]
    cfg = _config(_parser().parse_args(args))
    assert cfg.admin_api_keys == ["a-file", "a-env", "a-flag"] and cfg.training.enabled
    assert cfg.training.objective == "kto" and cfg.resolved_run_dir() == tmp_path / "runs" / "x"
    assert not _config(_parser().parse_args(args + ["--no-training"])).training.enabled
    path.write_text(json.dumps({"training": {"objectiv": "kto"}}))
    pytest.raises(ConfigError, _config, _parser().parse_args(args)).match("unknown training option")


def test_training_off_and_no_keys_configured(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "a.db")          # no keys: the admin API is open
    with ServerThread(create_app(state)) as srv, client(srv.url, None) as anon:
        assert anon.get("/v1/training/status").json() == {"enabled": False, "adapter_version": 0,
                                                           "pending_feedback": 0, "quarantined_feedback": 0}
        assert anon.get("/v1/adapters").json()["data"] == [{"object": "adapter", "version": 0, "active": True}]
        for path in ("/v1/adapters/0/activate", "/v1/training/pause", "/v1/training/resume"):
            r = anon.post(path)
            assert r.status_code == 409 and r.json()["error"]["code"] == "training_disabled", r.text
        assert "alchemist_train_steps_total" in anon.get("/metrics").text
    assert not (tmp_path / "runs").exists()


# -- a real `alchemist serve` process: kill -9 and restart ---------------------------------------

def _checkpointed_version(run_dir: Path) -> int:
    latest = (run_dir / "latest").read_text().strip()
    return json.loads((run_dir / latest / "state.json").read_text())["version"]


def _counts(db: Path) -> dict:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM feedback GROUP BY status").fetchall())


class Process:
    """`alchemist serve` as a subprocess with its own ALCHEMIST_HOME (checkpoints in runs/default)."""

    def __init__(self, tiny_model: Path, tmp_path: Path):
        self.home, port = tmp_path / "home", free_port()
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"db_path": str(self.home / "feedback.db"), "admin_api_keys": [ADMIN],
                                      "engine": {"device": "cpu", "kv_cache_bytes": 16 << 20,
                                                 "activation_pool_bytes": 16 << 20},
                                      "training": {**TRAINING, "checkpoint_every": 2}}))
        self.env = {k: v for k, v in os.environ.items() if k not in ("ALCHEMIST_API_KEYS", "ALCHEMIST_ADMIN_KEYS")}
        self.env.update(ALCHEMIST_HOME=str(self.home), PYTHONPATH=str(ROOT))
        self.cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
                    "--model", str(tiny_model), "--log-level", "info"]
        self.url, self.log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
        self.run_dir = self.home / "runs" / "default"

    def start(self) -> subprocess.Popen:
        return serve_process(self.cmd, self.env, self.log, self.url, cwd=ROOT)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)


def _train_then_kill(proc: Process) -> tuple[list[str], set[str], int]:
    """3 rated chats, one step each (checkpoint after the 2nd), 2 more, kill -9 while they train."""
    server, fids = proc.start(), []
    try:
        with client(proc.url, ADMIN) as http:
            for _ in range(3):
                fids.append(rate(http, chat(http)))
                wait_for(lambda: status(http)["totals"].get("steps", 0) >= len(fids), what="a step")
            assert status(http)["trained_feedback"] >= 2
            fids += [rate(http, chat(http)) for _ in range(2)]
            trained_before = {f for f in fids if http.get(f"/feedback/{f}").json()["status"] == "trained"}
            served_version = status(http)["adapter_version"]
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    return fids, trained_before, served_version


def _restart_and_finish(proc: Process, fids, trained_before, served_version, checkpointed: int) -> int:
    """Restart: the checkpoint is resumed, nothing committed is lost, nothing trained twice; the
    ratings not checkpointed before the crash are trained again (one step). SIGTERM at the end."""
    server = proc.start()
    try:
        with client(proc.url, ADMIN) as http:
            s = status(http)
            assert s["adapter_version"] >= checkpointed and s["next_version"] > served_version
            got = {f: http.get(f"/feedback/{f}") for f in fids}
            assert all(r.status_code == 200 for r in got.values())            # no committed rating lost
            assert all(got[f].json()["status"] == "trained" for f in trained_before)   # not trained again
            assert s["trained_feedback"] + s["trained_since_checkpoint"] + s["pending_feedback"] == len(fids)
            wait_for(lambda: (v := status(http))["pending_feedback"] == 0 or v["totals"].get("steps"),
                     what="the rest trained")
            final_version = status(http)["adapter_version"]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) in (0, -signal.SIGTERM), proc.log.read_text()[-3000:]
    return final_version


def test_kill_9_during_training_then_restart_and_export(tiny_model, tmp_path):
    proc = Process(tiny_model, tmp_path)
    fids, trained_before, served_version = _train_then_kill(proc)
    checkpointed = _checkpointed_version(proc.run_dir)
    assert checkpointed >= 1 and len(trained_before) >= 2
    counts = _counts(proc.home / "feedback.db")
    assert sum(counts.values()) == len(fids) and counts.get("trained", 0) >= len(trained_before)

    final_version = _restart_and_finish(proc, fids, trained_before, served_version, checkpointed)
    assert _counts(proc.home / "feedback.db") == {"trained": len(fids)}
    assert _checkpointed_version(proc.run_dir) == final_version          # the final checkpoint at shutdown

    out = tmp_path / "exported"
    done = proc.cli("export-adapter", "--version", str(final_version), "--out", str(out), "--home", str(proc.home))
    assert done.returncode == 0, done.stderr
    state, lora = load_peft(out)
    saved, _ = load_peft(proc.run_dir / (proc.run_dir / "latest").read_text().strip())
    assert lora.rank == 4 and state.keys() == saved.keys()
    assert all(a.equal(saved[n][0]) and b.equal(saved[n][1]) for n, (a, b) in state.items())
    missing = proc.cli("export-adapter", "--version", "12345", "--out", str(out), "--home", str(proc.home))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr and str(final_version) in missing.stderr


def test_a_restarted_server_serves_the_resumed_version_before_its_first_request(tiny_model, tmp_path):
    """The trainer offers the checkpoint's version at start; the server makes it live before the engine
    thread runs, so the first request and the first status read already see it (no window at version 0)."""
    state = tiny_state(tiny_model, tmp_path / "a.db", run_dir=tmp_path / "run", training=TrainerConfig(**TRAINING))
    state.trainer.versions.publish(state.trainer.masters)           # version 1, then a checkpoint of it
    state.trainer.checkpoint()
    state.close()
    again = tiny_state(tiny_model, tmp_path / "a.db", run_dir=tmp_path / "run", training=TrainerConfig(**TRAINING))
    try:
        assert again.trainer.version == 1 and again.adapter_version == 1      # engine thread not started
    finally:
        again.close()


def test_pool_tier_metrics_per_kind(server, user, admin):
    """Issue 18: the pool's bytes per tier and kind, demotions, copy traffic and where trained rows came
    from are on /metrics with every kind of the model."""
    from prometheus_client.parser import text_string_to_metric_families
    chat(user)
    families = {f.name: f for f in text_string_to_metric_families(admin.get("/metrics").text)}
    kinds = set(server.state.llm.activation_pool.layout.dims)
    held = families["alchemist_activation_pool_kind_bytes"].samples
    assert {(s.labels["tier"], s.labels["kind"]) for s in held} == {(t, k) for t in ("device", "retained", "cpu")
                                                                    for k in kinds}
    assert sum(s.value for s in held if s.labels["tier"] == "device") > 0          # the chat was captured
    rows = families["alchemist_train_pool_rows"].samples
    assert {s.labels["source"] for s in rows} == {"device", "retained", "cpu", "recomputed"}
    assert {s.labels["direction"] for s in families["alchemist_activation_pool_copy_bytes"].samples} == {"d2h", "h2d"}
    assert "alchemist_activation_pool_demoted_rows" in families
