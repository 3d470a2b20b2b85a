"""Acceptance of /dashboard in a real browser: headless Chromium (Debian's `chromium` package, never a
downloaded one) driven by Playwright, against a live server with online training that has served
chats and completions, taken ratings and trained. Every panel must render data (asserted on the DOM:
each <section data-panel> carries data-points, the count of values it drew, and its newest values as
text), with no console errors. The screenshot is written to $ALCHEMIST_ARTIFACTS/dashboard.png
(default tests/artifacts/, ignored by git). Skipped, saying why, when no Chromium is found."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.testing import ServerThread, tiny_state
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent
KEY, ADMIN = "sk-dashboard", "sk-dashboard-admin"     # the page needs only a plain key
PANELS = ("throughput", "ttft", "itl", "requests", "kv_cache", "memory", "trained_tokens", "reuse_outcomes",
          "ratings", "positive_share", "pending", "backlog_tokens", "oldest_pending", "adapter")
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("ALCHEMIST_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found: install Debian's package "
                                "(apt-get install chromium; .ci/run does) or set ALCHEMIST_CHROMIUM")


def artifacts_dir() -> Path:
    path = Path(os.environ.get("ALCHEMIST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("dashboard")
    training = TrainerConfig(lora_rank=4, lora_alpha=8.0, lr=1e-3, checkpoint_every=1, min_records_per_step=1)
    state = tiny_state(tiny_model, home / "alchemist.db", run_dir=home / "run", api_keys=[KEY],
                       admin_api_keys=[ADMIN], metrics_auth=True, dashboard_interval_s=0.5,
                       training=training)
    with ServerThread(create_app(state)) as srv:
        yield srv


def serve_and_rate(url: str, count: int = 6, start: int = 0) -> None:
    """Chats and completions, rated up and down."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for i in range(start, start + count):
            if i % 2:
                r = http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"hello number {i}"}], "max_tokens": 8})
            else:
                r = http.post("/v1/completions", json={
                    "prompt": f"{i} is the number that starts this prompt, long enough for two blocks",
                    "max_tokens": 8})
            assert r.status_code == 200, r.text
            rating = 1 if i % 3 else -1                     # four up, two down
            r = http.post("/feedback", json={"id": r.json()["id"], "choice_index": 0, "rating": rating})
            assert r.status_code == 201, r.text


def train_then_pause_with_a_backlog(url: str) -> None:
    """Rated answers until a training step is live; then training paused and one more rated answer,
    which waits: the keep-up panel has a backlog to show."""
    serve_and_rate(url)
    end = time.monotonic() + 60
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        while time.monotonic() < end:
            s = admin.get("/v1/training/status")
            assert s.status_code == 200, s.text
            if s.json()["adapter_version"] >= 1 and s.json()["pending_feedback"] == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no training step went live: {s.text}")
        assert admin.post("/v1/training/pause").status_code == 200
    serve_and_rate(url, count=1, start=6)


def test_every_panel_renders_data_in_chromium(server):
    from playwright.sync_api import Error as PlaywrightError, TimeoutError as PlaywrightTimeout, sync_playwright
    train_then_pause_with_a_backlog(server.url)
    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, chromium_sandbox=False,
                                     args=CHROMIUM_FLAGS)
        try:
            anonymous = browser.new_page()           # the /metrics rule: no page without the key
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                anonymous.goto(f"{server.url}/dashboard")   # headless: the sign-in dialog is cancelled
            anonymous.close()
            # the browser's sign-in dialog: HTTP Basic, the key as password (any user name)
            context = browser.new_context(viewport={"width": 1400, "height": 1100},
                                          http_credentials={"username": "operator", "password": KEY})
            page = context.new_page()
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.on("pageerror", lambda err: errors.append(str(err)))
            data_urls = []
            page.on("request", lambda req: "/dashboard/data" in req.url and data_urls.append(req.url))
            assert page.goto(f"{server.url}/dashboard").status == 200
            try:
                page.wait_for_function("""panels => panels.every(p => {
                        const s = document.querySelector(`section[data-panel="${p}"]`);
                        return s && Number(s.dataset.points) > 0; }) && document.querySelector(
                        '[data-stat="training_paused"]').dataset.value === "1" && Number(document
                        .querySelector('[data-stat="backlog_tokens"]').dataset.value) > 0""",
                                       arg=list(PANELS), timeout=30_000)
            except PlaywrightTimeout:
                empty = page.eval_on_selector_all("section[data-panel]", """nodes => nodes
                    .filter(n => !(Number(n.dataset.points) > 0)).map(n => n.dataset.panel)""")
                pytest.fail(f"panels without data after 30 s: {empty}; console errors: {errors}")
            # later refreshes ask only for newer points (?since=) and append them to what the page holds
            shown = int(page.text_content("#status").split()[0])
            page.wait_for_function("n => Number(document.querySelector('#status').textContent.split(' ')[0]) > n",
                                   arg=shown, timeout=15_000)
            page.wait_for_timeout(500)
            shot = artifacts_dir() / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            panels = page.eval_on_selector_all("section[data-panel]", """nodes => nodes.map(n => ({
                id: n.dataset.panel, points: Number(n.dataset.points),
                latest: n.querySelector('.latest').textContent,
                paths: n.querySelectorAll('svg path').length}))""")
            status = page.get_attribute("#status", "data-state")
            stats = page.eval_on_selector_all("[data-stat]", """nodes => Object.fromEntries(nodes.map(n =>
                [n.dataset.stat, n.querySelector('b').textContent]))""")
        finally:
            browser.close()
    by_id = {p["id"]: p for p in panels}
    assert sorted(by_id) == sorted(PANELS), by_id
    assert all(p["points"] > 0 and p["paths"] >= 1 for p in panels), panels
    assert status == "ok", status
    assert "version" in by_id["adapter"]["latest"] and "weights" in by_id["memory"]["latest"], by_id
    assert "positive" in by_id["positive_share"]["latest"] and "p50" in by_id["ttft"]["latest"], by_id
    assert "since=" not in data_urls[0] and all("since=" in u for u in data_urls[1:]), data_urls
    assert stats["training_paused"] == "paused" and int(stats["backlog_tokens"]) > 0, stats
    assert stats["oldest_pending_s"].endswith(" s") and stats["train_tps_window"].endswith(" tok/s"), stats
    assert "tokens" in by_id["backlog_tokens"]["latest"] and "age" in by_id["oldest_pending"]["latest"], by_id
    assert not errors, errors
    assert shot.stat().st_size > 10_000
