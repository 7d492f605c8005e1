"""The HTTP API: ``create_app(predictor)`` -> a FastAPI app (OpenAPI docs at ``/docs``).

Endpoints:
    POST /predict   body: a JSON list of raw rows ``[{column: value}, ...]`` -> ``{"scores": [...]}``
                    (a list column's value is a JSON array, see :mod:`ctrflow.serve.list_inputs`)
    POST /rank      body: ``{"context": {...}, "candidates": [{...}, ...]}`` ->
                    ``{"ranked": [{"index": i, "score": s, "candidate": {...}}, ...]}`` (highest first)
    GET  /health    ``{"status": "ok", ...}``
    GET  /metadata  model, schema, versions, workflow columns, limits

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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

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

log = logging.getLogger("ctrflow.serve")

_ROW = {"type": "object", "additionalProperties": True, "description": "raw input columns -> values"}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "items": _ROW, "minItems": 1}}}}}
_RANK_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["candidates"],
    "properties": {"context": _ROW, "candidates": {"type": "array", "items": _ROW, "minItems": 1}}}}}}}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN / Infinity


def create_app(predictor: Predictor, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
               batching: bool = True, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> FastAPI:
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

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse({"detail": e.message, "field": e.field}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
        return JSONResponse({"detail": str(e), "field": e.field}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # a bug, never bad input: log it
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}", "field": None}, status_code=500)

    async def read_body(request: Request) -> bytes:  # RequestLimits has checked the size already / stops at it
        return b"".join([chunk async for chunk in request.stream()])

    def parse_json(body: bytes) -> Any:
        if not body.strip():
            raise HTTPError(400, "empty request body: send JSON", "body")
        try:  # NaN (what Python's json.dumps writes for a missing float) reads as null
            return json.loads(body, parse_constant=lambda c: None if c == "NaN" else float(c))
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

    async def score(columns: Any) -> Any:
        if batcher is None:
            return await run_in_threadpool(predictor.score_columns, columns)
        return await asyncio.wrap_future(batcher.submit(columns))

    @app.post("/predict", openapi_extra=_PREDICT_BODY, summary="Score raw rows")
    async def predict(request: Request) -> dict[str, Any]:
        columns = await run_in_threadpool(parse_predict, await read_body(request))
        scores = await score(columns)
        return {"scores": [_finite(x) for x in scores.tolist()]}

    @app.post("/rank", openapi_extra=_RANK_BODY, summary="Rank candidates for one context")
    async def rank(request: Request) -> dict[str, Any]:
        candidates, columns = await run_in_threadpool(parse_rank, await read_body(request))
        ranked = rank_order(await score(columns))
        return {"ranked": [{"index": i, "score": _finite(s), "candidate": candidates[i]} for i, s in ranked]}

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.info.get("model_class", type(predictor.model).__name__),
                "device": str(predictor.device)}

    @app.get("/metadata", summary="Model, schema, versions, workflow columns")
    def metadata() -> dict[str, Any]:
        batching_info = {"enabled": batcher is not None, "max_rows": batcher.max_rows if batcher else None,
                         "model_calls": batcher.batches if batcher else None,
                         "requests": batcher.requests if batcher else None}
        return {**predictor.metadata(), "batching": batching_info,
                "limits": {"max_rows": max_rows, "max_bytes": max_bytes, "max_in_flight": max_in_flight,
                           "in_flight": limits.in_flight, "rejected_too_large": limits.too_large,
                           "rejected_busy": limits.busy}}

    return app
