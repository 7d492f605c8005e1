"""The HTTP API: ``create_app(predictor)`` -> a FastAPI app (OpenAPI docs at ``/docs``).

Endpoints:
    POST /predict   body: a JSON list of raw rows ``[{column: value}, ...]`` -> ``{"scores": [...]}``
                    (a list column's value is a JSON array, see :mod:`ctrflow.serve.list_inputs`)
    POST /rank      body: ``{"context": {...}, "candidates": [{...}, ...]}`` ->
                    ``{"ranked": [{"index": i, "score": s, "candidate": {...}}, ...]}`` (highest first)
    GET  /health    ``{"status": "ok", ...}``
    GET  /metadata  model, schema, versions, workflow columns, limits

Access (:mod:`ctrflow.serve.access`): with a ``token``, every request but ``GET /health`` needs
``Authorization: Bearer <token>`` (401 otherwise); a POST body must be ``Content-Type: application/json``
(415 otherwise). No response shows a file-system path: ``/metadata`` names the run, dataset and
checkpoint by their directory or file name, and a 500 says only that the error is in the server's log.

Bad input never reaches the model unchecked and never yields a 500: malformed JSON -> 400, a body
over ``max_bytes`` or more than ``max_rows`` rows -> 413, a missing column / wrong type / empty list ->
422; more than ``max_in_flight`` requests at once -> 503 with ``Retry-After``; every error body is
``{"detail": message, "field": name}``. Size and concurrency are enforced by
:class:`~ctrflow.serve.limits.RequestLimits` before a body is parsed (an oversized ``Content-Length`` is
refused unread, a chunked body as soon as it passes the limit). Parsing and validation run in worker
threads, scoring in the :class:`~ctrflow.serve.batcher.Batcher`'s thread (concurrent requests share one
transform + model call), so the event loop keeps answering ``/health`` while a large request is scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ctrflow.serve.access import AccessRules
from ctrflow.serve.batcher import Batcher
from ctrflow.serve.inputs import ServeError
from ctrflow.serve.limits import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_ROWS,
    HTTPError,
    LimitStats,
    RequestLimits,
)
from ctrflow.serve.predictor import Predictor, rank_order

try:  # optional (the serve extra): parses a 256-row body ~4x faster than the standard library
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

log = logging.getLogger("ctrflow.serve")
_DIGITS_TO_0, _LONG_DIGITS = bytes.maketrans(b"123456789", b"000000000"), b"0" * 20

_ROW = {"type": "object", "additionalProperties": True, "description": "raw input columns -> values"}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "items": _ROW, "minItems": 1}}}}}
_RANK_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["candidates"],
    "properties": {"context": _ROW, "candidates": {"type": "array", "items": _ROW, "minItems": 1}}}}}}}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN / Infinity


def _json(doc: Any) -> Response:
    """``doc`` encoded once by ``json.dumps``: FastAPI's default walks every value of the reply in Python first."""
    return Response(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), media_type="application/json")


def loads_json(body: bytes) -> Any:
    """A request body parsed as the standard library parses it, NaN read as null (what Python's
    ``json.dumps`` writes for a missing float).

    orjson (the serve extra) parses it when installed, ~3x faster; whatever orjson refuses (NaN, Infinity,
    lone surrogates, malformed JSON, whose error the standard parser words) and a body with a run of 20
    digits (orjson reads an integer literal past 64 bits as a float) go to the standard parser.

    Raises:
        json.JSONDecodeError, UnicodeDecodeError, RecursionError: as ``json.loads``.
    """
    if orjson is not None and _LONG_DIGITS not in body.translate(_DIGITS_TO_0):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=lambda c: None if c == "NaN" else float(c))


def _looks_like_path(s: str) -> bool:
    return os.path.isabs(s) or s.startswith(("~", "./", "../")) or (os.sep in s and os.path.exists(s))


def redact_paths(doc: Any) -> Any:
    """``doc`` with every string that is a file-system path replaced by its last part (``/a/b/run`` -> ``run``)."""
    if isinstance(doc, dict):
        return {k: redact_paths(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [redact_paths(v) for v in doc]
    if isinstance(doc, str) and _looks_like_path(doc):
        return os.path.basename(os.path.normpath(doc))
    return doc


def public_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """``Predictor.metadata()`` for the API: the run, dataset and checkpoint by name, no path anywhere."""
    meta = dict(meta)
    names = {k: os.path.basename(os.path.normpath(v)) if isinstance(v, str) and v else v
             for k, v in (("run", meta.pop("run_dir", None)), ("dataset", meta.pop("data_dir", None)))}
    return redact_paths({"model": meta.pop("model", None), **names, **meta})


def create_app(predictor: Predictor, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
               batching: bool = True, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, token: str | None = None,
               processes: int = 1) -> FastAPI:
    """Build the app around a loaded :class:`Predictor`.

    Args:
        predictor: the model and workflow to serve.
        max_rows: most rows (``/predict``) or candidates (``/rank``) per request; more -> 413.
        max_bytes: largest request body; more -> 413, from ``Content-Length`` before reading, else as soon
            as a streamed body passes it.
        batching: score concurrent requests together (:class:`~ctrflow.serve.batcher.Batcher`, up to the
            predictor's ``batch_size`` rows per model call); False scores each request on its own.
        max_in_flight: most POST requests served at once; more -> 503 with ``Retry-After`` (GETs are not
            counted, so ``/health`` answers under load).
        token: the bearer token every request but ``GET /health`` must send (None: none needed); see
            :func:`ctrflow.serve.access.load_token`.
        processes: how many server processes share the port (``--processes``; shown by ``/metadata``, whose
            ``server.pid`` names the process that answered). Limits and batching are per process.

    Returns:
        The FastAPI application (run it with uvicorn, or call it with ``fastapi.testclient.TestClient``).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    limits = LimitStats(max_bytes, max_in_flight)  # checks max_bytes, max_in_flight
    batcher = Batcher(predictor) if batching else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:
            batcher.close()

    app = FastAPI(title="ctrflow.serve", version="1", lifespan=lifespan,
                  description="Scores raw rows with a trained ctrflow model behind its fitted ETL workflow.")
    app.state.predictor, app.state.batcher, app.state.limits = predictor, batcher, limits
    app.add_middleware(RequestLimits, stats=limits)
    app.add_middleware(AccessRules, token=token, max_bytes=max_bytes)  # added last: runs first

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse({"detail": e.message, "field": e.field}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
        return JSONResponse({"detail": str(e), "field": e.field}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # a bug, never bad input: log it
        log.exception("internal error on %s", request.url.path)  # the message may hold paths: the log only
        return JSONResponse({"detail": f"internal error ({type(e).__name__}): see the server's log", "field": None},
                            status_code=500)

    async def read_body(request: Request) -> bytes:  # RequestLimits has checked the size already / stops at it
        return b"".join([chunk async for chunk in request.stream()])

    def parse_json(body: bytes) -> Any:
        if not body.strip():
            raise HTTPError(400, "empty request body: send JSON", "body")
        try:
            return loads_json(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON: {e}", "body") from None
        except RecursionError:
            raise HTTPError(400, "malformed JSON: nested too deeply", "body") from None

    def check_rows(rows: Any, field: str) -> None:
        if isinstance(rows, list) and len(rows) > max_rows:
            raise HTTPError(413, f"{field} has {len(rows):,} rows, over the limit of {max_rows:,} per request", field)

    def parse_predict(body: bytes) -> Any:  # in a worker thread: JSON + validation cost CPU
        rows = parse_json(body)
        if isinstance(rows, dict) and "rows" in rows:  # {"rows": [...]} is accepted too
            rows = rows["rows"]
        check_rows(rows, "rows")
        return predictor.columns(rows)

    def parse_rank(body: bytes) -> tuple[list[Any], Any]:
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise HTTPError(422, "body must be an object {\"context\": {...}, \"candidates\": [...]}", "body")
        if "candidates" not in doc:
            raise HTTPError(422, "missing field 'candidates' (a list of objects)", "candidates")
        candidates = doc["candidates"]
        check_rows(candidates, "candidates")
        rows = predictor.rank_rows({} if doc.get("context") is None else doc["context"], candidates)
        return candidates, predictor.columns(rows, "candidates")

    async def parse(fn: Any, body: bytes) -> Any:  # in a worker thread: JSON + validation cost CPU
        if batcher is None:
            return await run_in_threadpool(fn, body)
        batcher.parsing += 1  # the batcher waits a little for these (the event loop is the only writer)
        try:
            return await run_in_threadpool(fn, body)
        finally:
            batcher.parsing -= 1

    async def score(columns: Any) -> Any:
        if batcher is None:
            return await run_in_threadpool(predictor.score_columns, columns)
        return await asyncio.wrap_future(batcher.submit(columns))

    @app.post("/predict", openapi_extra=_PREDICT_BODY, summary="Score raw rows")
    async def predict(request: Request) -> Response:
        columns = await parse(parse_predict, await read_body(request))
        scores = await score(columns)
        return _json({"scores": [_finite(x) for x in scores.tolist()]})

    @app.post("/rank", openapi_extra=_RANK_BODY, summary="Rank candidates for one context")
    async def rank(request: Request) -> Response:
        candidates, columns = await parse(parse_rank, await read_body(request))
        ranked = rank_order(await score(columns))
        return _json({"ranked": [{"index": i, "score": _finite(s), "candidate": candidates[i]} for i, s in ranked]})

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.info.get("model_class", type(predictor.model).__name__),
                "device": str(predictor.device)}

    @app.get("/metadata", summary="Model, schema, versions, workflow columns")
    def metadata() -> dict[str, Any]:
        batching_info = {"enabled": batcher is not None, "max_rows": batcher.max_rows if batcher else None,
                         "model_calls": batcher.batches if batcher else None,
                         "requests": batcher.requests if batcher else None}
        return {**public_metadata(predictor.metadata()), "batching": batching_info,
                "server": {"processes": processes, "pid": os.getpid()},
                "access": {"token_required": token is not None, "content_type": "application/json"},
                "limits": {"max_rows": max_rows, "max_bytes": max_bytes, "max_in_flight": max_in_flight,
                           "in_flight": limits.in_flight, "rejected_too_large": limits.too_large,
                           "rejected_busy": limits.busy}}

    return app
