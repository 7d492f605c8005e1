"""ctrflow.serve's command line (help, usage line, user errors), the README's request examples, and the
request limits enforced before a body is read (size -> 413, requests in flight -> 503 + Retry-After)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from ctrflow.etl import synthetic
from ctrflow.etl.run import main as etl_main
from ctrflow.serve import Predictor
from ctrflow.serve.__main__ import build_parser, prog_name
from ctrflow.serve.__main__ import main as serve_main
from ctrflow.train.fit import main as fit_main

# ---- the README's examples (README.md "## Serving"): keep these strings and the README's -d '...' equal ----
README_PREDICT = """[{"I1": 3, "I2": 0, "I3": 12, "I4": 25,
  "I5": 8257, "I6": 11, "I7": 21, "I8": 20, "I9": 49, "I10": 1, "I11": 2, "I12": null, "I13": 16, "C1": "f0670f38",
  "C2": "c9f68e94", "C3": "7689074c", "C4": "13528a67", "C5": "54fc682d", "C6": "b08439ce", "C7": "15b76cb5",
  "C8": "bdb66d40", "C9": "64e041e0", "C10": "1b7bdc01", "C11": "246fa398", "C12": "e52b92c9", "C13": "71b2c92c",
  "C14": "f9428894", "C15": "c303b023", "C16": "8c04b480", "C17": "5c54e9f8", "C18": "4c48e943", "C19": "ad3708e6",
  "C20": "051f1e02", "C21": "ca757b45", "C22": "19b5258b", "C23": "b05c9a2a", "C24": "90df80f3", "C25": "54d12484",
  "C26": null}]"""
README_RANK = """{"context": {"I1": 3, "I2": 0, "I3": 12,
  "I4": 25, "I5": 8257, "I6": 11, "I7": 21, "I8": 20, "I9": 49, "I10": 1, "I11": 2, "I12": null, "I13": 16,
  "C2": "c9f68e94", "C3": "7689074c", "C4": "13528a67", "C5": "54fc682d", "C6": "b08439ce", "C7": "15b76cb5",
  "C8": "bdb66d40", "C9": "64e041e0", "C10": "1b7bdc01", "C11": "246fa398", "C12": "e52b92c9", "C13": "71b2c92c",
  "C14": "f9428894", "C15": "c303b023", "C16": "8c04b480", "C17": "5c54e9f8", "C18": "4c48e943", "C19": "ad3708e6",
  "C20": "051f1e02", "C21": "ca757b45", "C22": "19b5258b", "C23": "b05c9a2a", "C24": "90df80f3", "C25": "54d12484",
  "C26": null}, "candidates": [{"C1": "96df67a0"}, {"C1": "9bb831c7"}]}"""
README_ROWS = '{"rows": ' + README_PREDICT + "}"  # the {"rows": [...]} form of the same body


# ---- command line -------------------------------------------------------------------------------
def _help_text(monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal width
    return " ".join(build_parser().format_help().split())


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    text = _help_text(monkeypatch)
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        default = action.default
        if default is None or default is argparse.SUPPRESS:
            continue
        if isinstance(default, bool):  # a switch: its help says what happens without it
            assert "default" in action.help, action.option_strings
        else:
            assert f"(default: {default})" in text, (action.option_strings, default)


def test_usage_names_the_command_the_user_typed():
    assert prog_name("/venv/bin/ctrflow-serve") == "ctrflow-serve"
    assert prog_name(r"C:\venv\Scripts\ctrflow-serve.exe".replace("\\", os.sep)) == "ctrflow-serve"
    assert prog_name("/src/ctrflow/serve/__main__.py") == "python -m ctrflow.serve"
    assert prog_name("") == "python -m ctrflow.serve"
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "ctrflow.serve", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m ctrflow.serve "), out
    script = os.path.join(os.path.dirname(sys.executable), "ctrflow-serve")
    if os.path.exists(script):  # the console script of an installed checkout
        out = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage: ctrflow-serve "), out


@pytest.mark.parametrize("argv, words", [
    (["--run", "r", "--max-in-flight", "0"], "--max-in-flight must be >= 1"),
    (["--run", "r", "--max-bytes", "-1"], "--max-bytes must be >= 1"),
    (["--run", "r", "--port", "70000"], "--port must be in 0..65535"),
    (["--run", "r", "--port", "http"], "invalid int value"),
    (["--run", "r", "--log-level", "loud"], "invalid choice"),
    (["--run", "r", "--bogus"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_and_exit_2(argv, words, capsys):
    assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1 and "Traceback" not in err


# ---- HTTP: a tiny trained run -------------------------------------------------------------------
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
with warnings.catch_warnings():  # starlette's note about httpx versions, not about this code
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from ctrflow.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    root = tmp_path_factory.mktemp("serve_cli")
    synthetic.generate(str(root / "raw"), rows=4000, seed=0, part_rows=4000)
    assert etl_main(["--input", str(root / "raw" / "train"), "--valid", str(root / "raw" / "valid"),
                     "--output", str(root / "proc"), "--no-progress"]) == 0
    assert fit_main(["--data", str(root / "proc"), "--out", str(root / "run"), "--max-steps", "20",
                     "--batch-size", "256", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
                     "--no-progress", "--no-loader-bench", "--threads", "1", "--lr", "0.01"]) == 0
    return Predictor.from_run(root / "run", device="cpu")


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_bytes=10_000)) as c:
        yield c


def test_the_readme_examples_score(client, predictor):
    r = client.post("/predict", content=README_PREDICT, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert len(scores) == 1 and 0 < scores[0] < 1
    np.testing.assert_allclose(scores, predictor.predict(json.loads(README_PREDICT)), atol=1e-6)
    r = client.post("/predict", content=README_ROWS, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["scores"] == scores, r.text
    r = client.post("/rank", content=README_RANK, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    ranked = r.json()["ranked"]
    doc = json.loads(README_RANK)
    assert sorted(x["index"] for x in ranked) == [0, 1]
    assert [x["candidate"] for x in ranked] == [doc["candidates"][x["index"]] for x in ranked]
    assert ranked[0]["score"] >= ranked[1]["score"] and all(0 < x["score"] < 1 for x in ranked)


# ---- request limits -----------------------------------------------------------------------------
def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""):
    """One raw ASGI request -> (status, headers, body, number of receive() calls the app made); a JSON
    ``content-type`` unless ``headers`` name one."""
    calls, sent = [0], []
    if not any(k == b"content-type" for k, _ in headers):
        headers = [*headers, (b"content-type", b"application/json")]

    async def receive():
        calls[0] += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(out), calls[0]


def test_an_oversized_content_length_is_refused_before_the_body_is_read(predictor):
    app = create_app(predictor, max_bytes=1000, batching=False)
    for path in ("/predict", "/rank", "/nowhere"):
        status, headers, body, reads = _asgi(app, "POST", path, [(b"content-length", b"1001"),
                                                               (b"content-type", b"application/json")])
        assert (status, body["field"], reads) == (413, "body", 0), (path, status, body)
        assert "1,001 bytes" in body["detail"] and headers["connection"] == "close"
    status, _, body, reads = _asgi(app, "POST", "/predict", [(b"content-length", b"12x")])
    assert (status, body["field"], reads) == (400, "body", 0)
    status, _, body, reads = _asgi(app, "POST", "/predict", [(b"content-length", b"2")], b"[]")
    assert (status, reads) == (422, 1)  # within the limit: read and parsed as usual
    assert app.state.limits.too_large == 3


def test_a_streamed_body_past_the_limit_gets_413(client):
    chunk = b"[" + b" " * 4095

    def chunks(n: int):
        yield from [chunk] * n

    r = client.post("/predict", content=chunks(3), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body", r.text  # 12 KiB over a 10 kB limit, no length
    assert r.headers["connection"] == "close"
    r = client.post("/predict", content=chunks(2), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]  # 8 KiB: read, then parsed
    assert client.get("/health").status_code == 200


def test_requests_past_max_in_flight_get_503_with_retry_after(predictor):
    entered, release = threading.Event(), threading.Event()
    blocked = Predictor(predictor.model, predictor.workflow, predictor.schema, device="cpu")

    def score_columns(columns):
        entered.set()
        assert release.wait(60)
        return predictor.score_columns(columns)

    blocked.score_columns = score_columns
    app = create_app(blocked, batching=False, max_in_flight=1)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve",
                                     headers={"content-type": "application/json"}) as c:
            first = asyncio.create_task(c.post("/predict", content=README_PREDICT))
            assert await asyncio.to_thread(entered.wait, 60)  # the first request holds the only slot
            busy = await c.post("/predict", content=README_PREDICT)
            busy_rank = await c.post("/rank", content=README_RANK)
            health, meta = await c.get("/health"), (await c.get("/metadata")).json()
            release.set()
            done = await first
            after = await c.post("/predict", content=README_PREDICT)
            return busy, busy_rank, health, meta, done, after, (await c.get("/metadata")).json()

    try:
        busy, busy_rank, health, meta, done, after, meta_after = asyncio.run(scenario())
    finally:
        release.set()
    for r in (busy, busy_rank):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "--max-in-flight 1" in r.json()["detail"] and r.json()["field"] is None
    assert health.status_code == 200 and meta["limits"]["in_flight"] == 1  # GETs are never refused
    assert done.status_code == 200 and after.status_code == 200, (done.text, after.text)
    assert done.json()["scores"] == after.json()["scores"]
    assert meta_after["limits"]["in_flight"] == 0 and meta_after["limits"]["rejected_busy"] == 2


def test_a_refused_body_is_drained_unparsed_unless_the_client_awaits_continue(predictor):
    app = create_app(predictor, max_bytes=1000, batching=False)
    app.state.limits.in_flight = app.state.limits.max_in_flight  # every slot taken
    try:
        status, headers, body, reads = _asgi(app, "POST", "/predict", [(b"content-length", b"2")], b"[]")
        assert (status, headers["retry-after"], reads) == (503, "1", 1)  # read to the end, so the client sees it
        status, _, _, reads = _asgi(app, "POST", "/predict", [(b"content-length", b"2"), (b"expect", b"100-continue")])
        assert (status, reads) == (503, 0)  # the client has not sent the body yet
        status, _, body, _ = _asgi(app, "POST", "/predict", [(b"transfer-encoding", b"chunked")], b" " * 1001)
        assert (status, body["field"]) == (413, "body")  # a chunked body past the limit, even while busy
    finally:
        app.state.limits.in_flight = 0
    assert app.state.limits.busy == 3


def test_create_app_checks_its_limits(predictor):
    for kwargs in ({"max_in_flight": 0}, {"max_bytes": 0}, {"max_rows": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            create_app(predictor, batching=False, **kwargs)
