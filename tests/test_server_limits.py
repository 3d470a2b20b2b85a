"""Limits on a real uvicorn server with the tiny random-weight model: bodies over max_request_bytes are
413 before they are read, and the HTTP layer closes slow or oversized requests (server/http_protocol.py).
A big body under the cap stalls no one: test_server_big_body.py."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from server.app import create_app
from server.testing import ServerThread, tiny_state

SMALL_CAP = 64 << 10


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    state = tiny_state(tiny_model, tmp_path_factory.mktemp("limits") / "a.db", max_request_bytes=SMALL_CAP,
                       header_timeout_s=1.0)
    with ServerThread(create_app(state)) as srv:
        yield srv


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (ConnectionResetError: a reset)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_content_length_over_the_cap_is_413_before_the_body_is_read(server):
    sock = _raw(server.url)
    sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
    status, error = _error_of(_read_all(sock))            # answered and closed after 1 KB of 100 MB
    assert status == 413
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"


def test_chunked_body_over_the_cap_is_cut_with_413(server):
    sock = _raw(server.url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b'{"prompt": "' + b"a" * 8180
    sent = 0
    while sent <= SMALL_CAP + len(piece):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sent += len(piece)
        piece = b"a" * 8192
    status, error = _error_of(_read_all(sock))
    assert status == 413 and error["code"] == "request_too_large"
    ok = httpx.post(server.url + "/tokenize", json={"prompt": "a" * 60000}, timeout=30)
    assert ok.status_code == 200                          # under the cap: served


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or a reset); False while it is open and silent."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def test_headers_must_arrive_within_header_timeout(server):
    start = time.monotonic()
    idle = [_raw(server.url) for _ in range(20)]          # connect, send nothing
    slow = [_raw(server.url) for _ in range(20)]          # slowloris: a header line now and then
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(idle + slow) and time.monotonic() - start < 6.0:
        time.sleep(0.2)
        for i, sock in enumerate(idle + slow):
            if i in closed_at:
                continue
            if _closed_by_server(sock):
                closed_at[i] = time.monotonic() - start
            elif sock in slow:
                try:
                    sock.sendall(b"X-a: b\r\n")         # data does not extend the deadline
                except OSError:
                    closed_at[i] = time.monotonic() - start
    assert len(closed_at) == len(idle + slow), "connections left open without complete headers"
    assert 0.9 < min(closed_at.values()) and max(closed_at.values()) < 4.0   # header_timeout_s = 1
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_a_1_mib_request_line_is_431_not_a_reset(server):
    sock = _raw(server.url)
    sock.sendall(b"GET /v1/models/" + b"m" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, error = _error_of(_read_all(sock))
    assert status == 431 and error["code"] == "headers_too_large"
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_uvicorn_runs_with_the_configured_limits(server):
    config = server.server.config
    cfg = config.app.state.alchemist.config
    assert config.timeout_keep_alive == cfg.keep_alive_timeout_s
    assert config.limit_concurrency == cfg.limit_concurrency
    assert config.h11_max_incomplete_event_size == cfg.max_header_bytes
    assert config.http.header_timeout_s == cfg.header_timeout_s == 1.0


def _response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read off a connection that stays open."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_small_body_answered_before_it_was_read_keeps_the_connection(tiny_model, tmp_path):
    """A 401 goes out before the body is read (auth runs first); the body arrives after it. The client
    was not told to close, so the connection must serve its next request: the rest of a small body is
    read and dropped, not cut by a close (a keep-alive client saw 'Server disconnected' under load)."""
    state = tiny_state(tiny_model, tmp_path / "a.db", api_keys=["k"])
    with ServerThread(create_app(state)) as srv:
        sock = _raw(srv.url)
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
        first = _response(sock)
        assert first.split()[1] == b"401" and b"connection: close" not in first.lower()
        time.sleep(0.3)
        sock.sendall(b"{not json" + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock).split()[1] == b"200"
