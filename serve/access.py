"""Who may call the API and how: an optional bearer token (401) and JSON-only request bodies (415).

:class:`AccessRules` is plain ASGI middleware (no FastAPI import), outside :class:`~ctrflow.serve.limits.RequestLimits`:

* with a token (``--token-file PATH`` or ``$CTRFLOW_SERVE_TOKEN``, see :func:`load_token`), every request
  but ``GET /health`` (liveness probes stay open) needs ``Authorization: Bearer <token>``; a missing or wrong
  one gets 401 with ``WWW-Authenticate: Bearer`` (RFC 6750). The comparison takes the same time wherever
  the tokens differ (``hmac.compare_digest``), so response times do not leak the token byte by byte.
* a request that may carry a body (any method but GET, HEAD, OPTIONS) must say
  ``Content-Type: application/json`` (parameters such as ``; charset=utf-8`` allowed), else 415. A browser
  page can POST ``text/plain`` or a form to another origin without asking first (no CORS preflight), but
  not ``application/json``: so no page a user visits can make their browser score rows on this server.

A refused body is drained unparsed (at most ``max_bytes``) so that the client reads the answer instead of
a reset connection, as :mod:`ctrflow.serve.limits` does for 503s.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from ctrflow.serve.limits import ASGIApp, HTTPError, Receive, Scope, Send, drain_body, respond

TOKEN_ENV = "CTRFLOW_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/health"})
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})
_REALM = 'Bearer realm="ctrflow.serve"'


def load_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token clients must send: ``token_file``'s text, else ``$CTRFLOW_SERVE_TOKEN``, else None (open).

    Raises:
        ValueError: an unreadable or empty file, an empty variable, a token with spaces or non-ASCII
            characters (it could not be sent in a header); one line that never quotes the token.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token, where = f.read().strip(), f"--token-file {token_file}"
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--token-file {token_file}: cannot read it ({type(e).__name__})") from None
    elif TOKEN_ENV in env:
        token, where = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if not token:
        raise ValueError(f"{where} is empty: put the token in it, or leave it unset to serve without one")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{where}: the token must be printable ASCII without spaces (it travels in a header)")
    return token


def is_json(content_type: str) -> bool:
    """``application/json`` with or without parameters (``; charset=utf-8``), in any letter case."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class AccessRules:
    """ASGI middleware enforcing the token and the JSON content type (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        token: the bearer token every request but ``/health`` needs; None: no token needed.
        max_bytes: most bytes of a refused body drained before answering (more: the connection is closed).
    """

    def __init__(self, app: ASGIApp, token: str | None, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self._token = token.encode("ascii") if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method", "GET") not in _NO_BODY and not await drain_body(scope, receive, self.max_bytes):
            error.headers["connection"] = "close"  # a body past max_bytes is not read to its end
        await respond(send, error)

    def _check(self, scope: Scope) -> HTTPError | None:
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        if self._token is not None and scope.get("path") not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not given.strip():
                return HTTPError(401, "this server needs a bearer token: send 'Authorization: Bearer <token>'",
                                 "authorization", {"www-authenticate": _REALM})
            if not hmac.compare_digest(given.strip(), self._token):
                return HTTPError(401, "invalid bearer token", "authorization",
                                 {"www-authenticate": f'{_REALM}, error="invalid_token"'})
        if scope.get("method", "GET") not in _NO_BODY:
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if not is_json(content_type):
                got = f"got {content_type.strip()[:60]!r}" if content_type.strip() else "none was given"
                return HTTPError(415, f"the request body must be JSON: send 'Content-Type: application/json' ({got})",
                                 "content-type")
        return None
