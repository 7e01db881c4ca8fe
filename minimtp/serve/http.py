"""The HTTP layer's defences and its shutdown, around uvicorn (docs: guides/serving, "Limits and shutdown").

* `guarded_protocol`: uvicorn's h11 protocol with a header deadline: a connection that has not sent a whole
  request head within ``header_timeout`` seconds of connecting (or of its last response) is closed, so idle and
  header-trickling sockets cannot pile up. uvicorn's ``timeout_keep_alive`` closes idle keep-alive connections;
  h11 caps the size of a request head.
* `BodyLimit`: an ASGI middleware that reads each request body before the app sees it: 413 past ``max_bytes``
  (from Content-Length, or while reading; uvicorn drops the rest, so the client reads the answer), 408 when
  it does not arrive within ``timeout`` seconds. The app then
  reads the buffered body; its later ``receive()`` calls still report the client's disconnect.
* `HTTPServer`: a uvicorn server whose shutdown (SIGTERM, SIGINT) first closes the serving loop to new requests
  (503), lets the running ones finish for ``drain_timeout`` seconds, cancels the rest - every stream gets its
  final chunk with a finish reason and ``data: [DONE]`` - and only then closes the connections.
"""

from __future__ import annotations

import asyncio
import json

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from minimtp.serve.errors import error_body


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """H11Protocol that closes a connection whose request head takes longer than ``header_timeout`` seconds."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()
            else:
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class BodyLimit:
    """ASGI middleware: buffer each HTTP request body, at most ``max_bytes``, arriving within ``timeout`` s."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _reply(send, 413, f"the body has {int(length)} bytes: the limit is {self.max_bytes}")
        chunks = []

        async def read() -> str | None:  # None: the whole body; else why not
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return "disconnect"
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    return f"the body is over the limit of {self.max_bytes} bytes"
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return None

        try:
            problem = await asyncio.wait_for(read(), self.timeout)
        except asyncio.TimeoutError:
            return await _reply(send, 408, f"the body did not arrive within {self.timeout:g} s", close=True)
        if problem == "disconnect":
            return
        if problem is not None:
            return await _reply(send, 413, problem)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, close: bool = False) -> None:
    """An error answer. A 413 keeps the connection open: uvicorn then reads and drops the rest of the body (closing
    at once would reset the connection while the client still sends, and it would never read the answer); the
    keep-alive deadline bounds how long that takes."""
    payload = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class HTTPServer(uvicorn.Server):
    """uvicorn.Server that drains the serving loop (module docstring) before it closes the connections."""

    def __init__(self, config: uvicorn.Config, serving, drain_timeout: float):
        super().__init__(config)
        self.serving = serving
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        self.serving.close()
        await self.serving.drain(self.drain_timeout)
        await super().shutdown(sockets)


def make_server(
    app,
    serving,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_request_bytes: int = 8 << 20,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    keep_alive_timeout: float = 5.0,
    drain_timeout: float = 10.0,
) -> HTTPServer:
    """The server for ``app``: the limits above, logging at warning level."""
    config = uvicorn.Config(
        BodyLimit(app, max_request_bytes, body_timeout),
        host=host,
        port=port,
        http=guarded_protocol(header_timeout),
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=5,
        log_level="warning",
    )
    return HTTPServer(config, serving, drain_timeout)
