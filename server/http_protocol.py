"""uvicorn with the limits a server facing clients needs, all from ServerConfig.

uvicorn (0.29 to 0.55 at least) has no timeout for reading a request's headers: its keep-alive timer
runs only between requests, so a client that connects and sends a header line now and then
(slowloris) holds its connection forever. GuardedH11Protocol adds that timer (`header_timeout_s`),
answers headers over `max_header_bytes` with a 431 in the OpenAI error shape, and closes a
connection whose request body it will not read (a 413 over the body cap, 431, a malformed request;
a small body answered before it was read, e.g. a 401, is drained instead) by shutting down its side first and dropping what still arrives for `LINGER_S` (a "lingering close"): closing a socket
with unread data resets the connection, and the client would lose the answer it was sent."""
from __future__ import annotations

import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 65536
    max_drain_bytes: int = 4 << 20     # an unread body up to this (max_request_bytes) is read and dropped

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer = None
        self._draining = False

    # -- the header-read timeout ----------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._draining:                       # lingering close: read and drop
            return
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()          # the request's headers are in

    def on_response_complete(self) -> None:
        unread = self.conn.their_state is h11.SEND_BODY   # answered before its body was read (401, 413)
        super().on_response_complete()                     # may start a pipelined next request
        if self.transport.is_closing() or self._draining:
            return
        if unread and self._body_too_big_to_drain():
            self._linger_close()
        elif self.conn.their_state is h11.IDLE:      # waiting for the next request's headers
            self._arm_header_timer()

    def _body_too_big_to_drain(self) -> bool:
        """Whether the unread rest of the request's body is too big (or of unknown size: chunked) to read
        and drop. A small one is drained by uvicorn (its Data events after our answer are skipped) and
        the connection stays usable, as the client, told nothing else, expects."""
        length = dict(self.headers or []).get(b"content-length")
        try:
            return length is None or int(length) > self.max_drain_bytes
        except ValueError:
            return True

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if self.header_timeout_s:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection that sent no complete headers in %ss", self.header_timeout_s)
            self.transport.close()

    # -- errors before the app runs ---------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """h11 rejected the request (uvicorn's own answer is a plain 400 and an abrupt close)."""
        too_long = len(self.conn.trailing_data[0]) > self.max_header_bytes
        status, code = (431, "headers_too_large") if too_long else (400, "invalid_http_request")
        message = (f"The request line and headers are over {self.max_header_bytes} bytes."
                   if too_long else msg)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:           # a response had already begun: nothing more to say
            self.transport.close()
            return
        self._linger_close()

    def _linger_close(self) -> None:
        self._draining = True
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        try:
            self.transport.write_eof()           # our answer is out: FIN, then drop what still comes
        except (NotImplementedError, OSError, RuntimeError, AttributeError):   # e.g. TLS
            self.transport.close()
            return
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(config) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with this server's limits (uvicorn builds one protocol per connection)."""
    return type("AlchemistH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": config.header_timeout_s, "max_header_bytes": config.max_header_bytes,
                 "max_drain_bytes": config.max_request_bytes})


def uvicorn_config(app, config, **overrides) -> uvicorn.Config:
    """uvicorn.Config for `app` with the limits of `config` (a ServerConfig); `overrides` win."""
    options = dict(host=config.host, port=config.port, log_level=config.log_level.lower(),
                   timeout_graceful_shutdown=config.graceful_shutdown_s, http=protocol_class(config),
                   ws="none", timeout_keep_alive=config.keep_alive_timeout_s,
                   limit_concurrency=config.limit_concurrency,
                   h11_max_incomplete_event_size=config.max_header_bytes)
    options.update(overrides)
    return uvicorn.Config(app, **options)
