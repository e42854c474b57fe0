"""Running the app under uvicorn with bounded connections: how long a client may take to send a
request, how many connections may be open, and how SIGTERM drains the server.

- `bind(host, port)` opens the listening socket first, so that a busy port is one clear error
  before the model is loaded, and the URL is printed only once the server listens.
- `TimedH11Protocol` (uvicorn's HTTP/1.1 protocol, bounded): a request's headers and body must
  arrive within `request_read_timeout` seconds of its first byte (else a 408 and the connection
  is closed: slowloris clients cannot hold connections), connections past `max_connections`
  are answered 503 and closed at once, and malformed HTTP gets a JSON 400.
- `uvicorn_config` sets the keep-alive timeout and the shutdown grace: on SIGTERM/SIGINT the
  server stops accepting, requests in flight get `shutdown_grace` seconds to finish, the rest
  are cancelled (their clients are disconnected, their rows leave the sampler) and it exits.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServeConfig


class PortInUse(ValueError):
    """The port is taken; a ValueError so that the CLI prints it as one line."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), or a one-line `ValueError` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ValueError(f"cannot bind --host {host!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is in use: pass --port N (another port)") from None
        if error.errno == errno.EACCES:
            raise ValueError(
                f"no permission to bind port {port} on {host}: pass --port N above 1023"
            ) from None
        raise ValueError(f"cannot bind {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _json_error(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response with an OpenAI-style JSON error body, closing the connection
    (written raw: the request may be incomplete, so h11 would refuse to send a response)."""
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    data = json.dumps({"error": body}).encode()
    head = (
        f"HTTP/1.1 {status} ".encode()
        + reason
        + b"\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
    )
    return head + data


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on reading each request and a cap on open
    connections (see the module docstring). Settings come from `limits`, set by
    `uvicorn_config` on a subclass."""

    limits: ServeConfig = ServeConfig()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._timed_cycle = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                503,
                b"Service Unavailable",
                f"the server has {self.limits.max_connections} connections open already; "
                "retry later",
                "too_many_connections",
            )
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a keep-alive connection
        super().data_received(data)
        if self._read_timer is not None and self.cycle is not None:
            their = self.conn.their_state
            if their is h11.DONE or their is h11.MUST_CLOSE or their is h11.CLOSED:
                self._disarm()  # the whole request has arrived

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(
            self.limits.request_read_timeout, self._read_timed_out
        )

    def _disarm(self) -> None:
        timer = getattr(self, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.conn.their_state is h11.DONE:
                return  # the request is in; its answer is being computed
            # The app is still reading the body: it will see a disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._refuse(
            408,
            b"Request Timeout",
            f"the request did not arrive within {self.limits.request_read_timeout:g} s; "
            "send it at once",
            "request_timeout",
        )

    def _refuse(self, status: int, reason: bytes, message: str, code: str) -> None:
        """Answer with a JSON error (if nothing was answered yet) and close the connection."""
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if not answering:
            self.transport.write(_json_error(status, reason, message, code))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, b"Bad Request", f"malformed HTTP request: {msg}", "bad_http")


def protocol_for(config: ServeConfig) -> type[TimedH11Protocol]:
    """A `TimedH11Protocol` class bound to the limits of `config`."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"limits": config})


def uvicorn_config(app, config: ServeConfig, **options) -> uvicorn.Config:
    """The uvicorn settings of `app` under `config` (timeouts, connection cap, shutdown grace);
    `options` are passed on (e.g. log_level)."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=protocol_for(config),
        lifespan="on",
        timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.shutdown_grace,  # type: ignore[arg-type]
        **options,
    )


class Server(uvicorn.Server):
    """A uvicorn server that calls `on_listening()` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_listening is not None:
            self.on_listening()
