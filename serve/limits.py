"""Request limits enforced before the app reads a body: size (413) and requests in flight (503).

:class:`RequestLimits` is plain ASGI middleware (no FastAPI import, so ``python -m ctrflow.serve --help``
works without the ``serve`` extra). For every request that may carry a body (any method but GET, HEAD,
OPTIONS) it

* answers 413 from the ``Content-Length`` header alone, without reading a byte of an oversized body,
  and closes the connection so the client stops uploading;
* counts the bytes of a streamed (chunked) body as the app reads them and raises :class:`HTTPError`
  413 the moment they pass ``max_bytes``, so no more than ``max_bytes`` (+ one chunk) is ever held;
* answers 503 with ``Retry-After`` while ``max_in_flight`` requests are already being served, so a
  burst queues in the clients, not in the server's memory (``GET /health`` and ``/metadata`` are never
  refused: liveness probes still answer under load). The refused body is drained unparsed (at most
  ``max_bytes``) so that the client reads the 503 rather than a reset connection.

A 413 from ``Content-Length`` closes the connection without reading the body: a client that sent
``Expect: 100-continue`` (curl above 1 MiB, most HTTP libraries for large bodies) gets it before uploading;
one that uploads everything before reading its response may see the connection reset instead.

Error bodies are ``{"detail": message, "field": name}`` like every other error of the API.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 32 * 2**20
DEFAULT_MAX_IN_FLIGHT = 64
RETRY_AFTER_S = 1  # what a 503 asks the client to wait, in seconds

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


class HTTPError(Exception):
    """An error response: status code, one-line message, the field at fault, extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


class LimitStats:
    """Limits and live counters shared by the middleware and ``/metadata``."""

    def __init__(self, max_bytes: int, max_in_flight: int) -> None:
        if max_bytes < 1 or max_in_flight < 1:
            raise ValueError(f"max_bytes and max_in_flight must be >= 1, got {max_bytes}, {max_in_flight}")
        self.max_bytes, self.max_in_flight = max_bytes, max_in_flight
        self.in_flight = 0  # requests being served now (one event loop: no lock needed)
        self.too_large = 0  # 413s answered by the limits
        self.busy = 0  # 503s answered


def too_large(size: int | None, max_bytes: int) -> HTTPError:
    """The 413 for a body of ``size`` bytes (None: a stream that passed the limit); closes the connection."""
    what = f"request body of {size:,} bytes is" if size is not None else "request body is"
    return HTTPError(413, f"{what} over the limit of {max_bytes:,} bytes (--max-bytes)", "body",
                     {"connection": "close"})


class RequestLimits:
    """ASGI middleware enforcing :class:`LimitStats` (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        stats: the limits, and the counters this middleware keeps up to date.
    """

    def __init__(self, app: ASGIApp, stats: LimitStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET") in _NO_BODY:
            await self.app(scope, receive, send)
            return
        stats = self.stats
        lengths = [v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if lengths:
            text = lengths[0].decode("latin-1").strip()
            if len(lengths) > 1 or not text.isdigit():
                await respond(send, HTTPError(400, "invalid Content-Length header", "body", {"connection": "close"}))
                return
            if int(text) > stats.max_bytes:  # refused before a byte of the body is read
                stats.too_large += 1
                await respond(send, too_large(int(text), stats.max_bytes))
                return
        if stats.in_flight >= stats.max_in_flight:
            stats.busy += 1
            if not await drain_body(scope, receive, stats.max_bytes):
                await respond(send, too_large(None, stats.max_bytes))
                return
            await respond(send, HTTPError(
                503, f"server busy: {stats.in_flight} requests in flight (--max-in-flight {stats.max_in_flight}); "
                f"retry after {RETRY_AFTER_S} s", None, {"retry-after": str(RETRY_AFTER_S)}))
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > stats.max_bytes:  # a chunked body past the limit: stop reading here
                    stats.too_large += 1
                    raise too_large(None, stats.max_bytes)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        stats.in_flight += 1
        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPError as e:  # raised where the app has no handler for it (the app's own handler answers first)
            if started:
                raise
            await respond(send, e)
        finally:
            stats.in_flight -= 1


async def drain_body(scope: Scope, receive: Receive, max_bytes: int) -> bool:
    """Read and drop a request's body (False: it passed ``max_bytes``), unless the client awaits ``100 Continue``.

    A refused request's body is drained, not parsed, so that the client reads the refusal: uvicorn closes
    a ``Connection: close`` connection right after the response, and closing a socket with unread data
    resets it (the client sees "connection reset" instead of the 503). A client that sent
    ``Expect: 100-continue`` has not sent its body yet, and will not.
    """
    if any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ())):
        return True
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return True
        size += len(message.get("body", b""))
        if size > max_bytes:
            return False
        if not message.get("more_body", False):
            return True


async def respond(send: Send, e: HTTPError) -> None:
    """Send ``e`` as the API's JSON error body."""
    body = json.dumps({"detail": e.message, "field": e.field}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
