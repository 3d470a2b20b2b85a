"""A 10 MB body is tokenized off the event loop: while it is read, parsed, tokenized (2.6 M tokens) and
answered, another client's stream and /health go on. Three processes, so that no GIL but the server's
is measured: `alchemist serve` with the tiny random-weight model, a light watcher (httpx only) that
streams chat completions back to back and polls /health, and this test, which sends the body."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.embedded_model import ensure_default_model
from server.testing import free_port, make_tiny_model, serve_process

ROOT = Path(__file__).resolve().parent.parent
CAP = 16 << 20
# Streams long chat completions back to back and polls /health until stdin closes; then prints
# {"gaps": [[arrival, gap], ...], "health": [[sent, latency, status], ...]} (time.time() stamps).
WATCHER = r'''
import json, sys, threading, time, httpx
url, stop, gaps, health = sys.argv[1], threading.Event(), [], []
def stream():
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                last = None
                for line in r.iter_lines():
                    now = time.time()
                    if line.startswith("data:"):
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now
                    if stop.is_set():
                        break
def poll():
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            sent = time.time()
            status = http.get("/health").status_code
            health.append((sent, time.time() - sent, status))
            time.sleep(0.05)
threads = [threading.Thread(target=stream), threading.Thread(target=poll)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(json.dumps({"gaps": gaps, "health": health}))
'''


@pytest.fixture
def server_url(tmp_path):
    model = make_tiny_model(tmp_path.parent / "tiny-llama-big-body", ensure_default_model())
    home, port = tmp_path / "home", free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"db_path": str(home / "a.db"), "max_request_bytes": CAP,
                                  "training": {"enabled": False},
                                  "engine": {"device": "cpu", "kv_cache_bytes": 32 << 20}}))
    env = {**os.environ, "ALCHEMIST_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ALCHEMIST_API_KEYS", None)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--model", str(model), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(cmd, env, tmp_path / "server.log", url)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _post(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    """http.client: its socket send and receive let go of the GIL (not that it matters here)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def test_a_10_mb_body_stalls_no_stream_and_no_health_check(server_url):
    text = "hello world, this is a long body. " * (10_000_000 // 34)
    body = json.dumps({"prompt": text}).encode()
    assert 9_900_000 < len(body) < CAP
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, server_url], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "started"
        time.sleep(1.0)                                   # the stream is under way
        start = time.time()
        status, answer = _post(server_url, "/tokenize", body)
        end = time.time()
        time.sleep(0.3)
    finally:
        out, _ = watcher.communicate(timeout=120)
    assert watcher.returncode == 0
    assert status == 200 and json.loads(answer)["count"] > 2_000_000
    seen = json.loads(out)
    gaps = [gap for at, gap in seen["gaps"] if start <= at <= end]
    checks = [(latency, code) for sent, latency, code in seen["health"] if start <= sent <= end]
    print(f"\n10 MB /tokenize took {end - start:.1f} s; meanwhile {len(gaps)} stream chunks, worst gap "
          f"{max(gaps):.3f} s; {len(checks)} /health answers, slowest {max(c[0] for c in checks):.3f} s")
    assert len(gaps) > 100, "the stream did not run while the body was handled"
    assert max(gaps) < 0.5
    assert len(checks) > 10 and all(code == 200 for _, code in checks)
    assert max(latency for latency, _ in checks) < 0.5
