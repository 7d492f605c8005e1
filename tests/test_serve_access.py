"""ctrflow.serve's access rules (issue #14): the optional bearer token (401 + WWW-Authenticate, /health open,
constant-time comparison), JSON-only POST bodies (415), no file-system path in any response, and a busy port
refused in one line (exit 2) before the server says it is serving."""

from __future__ import annotations

import json
import os
import socket
import warnings

import pytest

from ctrflow.etl import synthetic
from ctrflow.etl.run import main as etl_main
from ctrflow.serve import Predictor
from ctrflow.serve.__main__ import bind
from ctrflow.serve.__main__ import main as serve_main
from ctrflow.serve.access import TOKEN_ENV, is_json, load_token
from ctrflow.train.fit import main as fit_main

fastapi = pytest.importorskip("fastapi")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from ctrflow.serve import create_app  # noqa: E402

TOKEN = "s3cret-Token_0123456789"
JSON = {"content-type": "application/json"}
AUTH = {"authorization": f"Bearer {TOKEN}", **JSON}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_access")
    synthetic.generate(str(root / "raw"), rows=3000, seed=1, part_rows=3000)
    assert etl_main(["--input", str(root / "raw" / "train"), "--valid", str(root / "raw" / "valid"),
                     "--output", str(root / "proc"), "--no-progress"]) == 0
    assert fit_main(["--data", str(root / "proc"), "--out", str(root / "run"), "--max-steps", "5",
                     "--batch-size", "256", "--embedding-dim", "4", "--layers", "8", "--bottom-layers", "8",
                     "--no-progress", "--no-loader-bench", "--threads", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor.from_run(run / "run", device="cpu")


@pytest.fixture(scope="module")
def rows(run) -> list[dict]:
    import pyarrow.parquet as pq

    df = pq.read_table(run / "raw" / "valid").to_pandas().drop(columns=["label"]).head(3)
    return json.loads(df.to_json(orient="records"))


@pytest.fixture(scope="module")
def guarded(predictor):
    with TestClient(create_app(predictor, token=TOKEN)) as c:
        yield c


def _error(r, status: int, field: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["field"] == field and body["detail"], body
    return body


# ---- bearer token -------------------------------------------------------------------------------
def test_health_stays_open_everything_else_needs_the_token(guarded, rows):
    assert guarded.get("/health").json()["status"] == "ok"
    for method, path in (("GET", "/metadata"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/predict"),
                         ("POST", "/rank"), ("GET", "/nowhere")):
        r = guarded.request(method, path, json=rows if method == "POST" else None)
        body = _error(r, 401, "authorization")
        assert r.headers["www-authenticate"] == 'Bearer realm="ctrflow.serve"', (path, r.headers)
        assert "Bearer" in body["detail"] and TOKEN not in r.text
    r = guarded.post("/predict", json=rows, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and len(r.json()["scores"]) == len(rows), r.text
    r = guarded.post("/predict", json=rows, headers={"authorization": f"bearer  {TOKEN} "})  # scheme: any case
    assert r.status_code == 200, r.text
    assert guarded.get("/metadata", headers=AUTH).json()["access"]["token_required"] is True


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer x", f"Basic {TOKEN}",
                                   "Bearer", TOKEN, f"Bearer {TOKEN.upper()}"])
def test_a_wrong_or_malformed_token_gets_401(guarded, rows, value):
    r = guarded.post("/predict", json=rows, headers={"authorization": value})
    _error(r, 401, "authorization")
    assert r.headers["www-authenticate"].startswith('Bearer realm="ctrflow.serve"')


def test_the_token_is_compared_in_constant_time(predictor, monkeypatch):
    import ctrflow.serve.access as access

    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    with TestClient(create_app(predictor, token=TOKEN)) as c:
        assert c.get("/metadata", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metadata", headers=AUTH).status_code == 200
    assert calls == [(b"wrong", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_load_token_from_file_or_environment(tmp_path):
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert load_token(str(f), {}) == TOKEN
    assert load_token(str(f), {TOKEN_ENV: "other"}) == TOKEN  # the file wins
    assert load_token(None, {TOKEN_ENV: TOKEN}) == TOKEN
    assert load_token(None, {}) is None
    bad = [(str(tmp_path / "nope"), {}, "cannot read"), (None, {TOKEN_ENV: " "}, "is empty"),
           (str(f.parent), {}, "cannot read")]
    for text in ("", "\n", "two words", "caf\u00e9"):
        g = tmp_path / f"t{len(bad)}"
        g.write_text(text)
        bad.append((str(g), {}, "empty" if not text.strip() else "printable ASCII"))
    for path, env, words in bad:
        with pytest.raises(ValueError, match=words) as e:
            load_token(path, env)
        assert "\n" not in str(e.value) and "caf" not in str(e.value)


def test_a_bad_token_file_exits_2_with_one_line(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    for path in (str(tmp_path / "missing"), str(empty)):
        assert serve_main(["--run", str(run / "run"), "--token-file", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --token-file") and err.count("\n") == 1 and "serving" not in err
    monkeypatch.setenv(TOKEN_ENV, "")
    assert serve_main(["--run", str(run / "run")]) == 2
    assert f"${TOKEN_ENV} is empty" in capsys.readouterr().err


# ---- content type -------------------------------------------------------------------------------
def test_post_bodies_must_be_json(predictor, rows):
    body = json.dumps(rows)
    with TestClient(create_app(predictor)) as c:
        for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/jsonx", "text/json"):
            for path in ("/predict", "/rank"):
                r = c.post(path, content=body, headers={} if ctype is None else {"content-type": ctype})
                text = _error(r, 415, "content-type")["detail"]
                assert "application/json" in text, text
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            r = c.post("/predict", content=body, headers={"content-type": ctype})
            assert r.status_code == 200, (ctype, r.text)
        assert c.get("/health").status_code == 200 and c.get("/metadata").status_code == 200  # GETs: no body
    assert is_json(" application/json ;charset=UTF-8") and not is_json("")


def test_the_token_is_checked_before_the_content_type(guarded, rows):
    r = guarded.post("/predict", content=json.dumps(rows), headers={"content-type": "text/plain"})
    _error(r, 401, "authorization")
    r = guarded.post("/predict", content=json.dumps(rows), headers={"content-type": "text/plain",
                                                                       "authorization": f"Bearer {TOKEN}"})
    _error(r, 415, "content-type")


# ---- no paths in responses ----------------------------------------------------------------------
def _strings(doc):
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)
    elif isinstance(doc, str):
        yield doc


def test_metadata_names_the_run_without_paths(guarded, run, predictor):
    r = guarded.get("/metadata", headers=AUTH)
    meta = r.json()
    assert str(run) not in r.text and os.path.basename(str(run)) not in r.text, "a path leaks"
    assert not [s for s in _strings(meta) if os.path.isabs(s) or os.sep * 2 in s]
    assert meta["run"] == "run" and meta["dataset"] == "proc" and "run_dir" not in meta and "data_dir" not in meta
    assert meta["model"]["checkpoint"] == os.path.basename(predictor.info["checkpoint"])
    assert meta["workflow"]["meta"]["inputs"] == ["train"]  # the ETL's input, by name
    assert os.path.isabs(predictor.metadata()["run_dir"])  # in-process metadata keeps the paths


def test_an_internal_error_shows_no_message(predictor, rows):
    broken = Predictor(predictor.model, predictor.workflow, predictor.schema, device="cpu")

    def score_columns(columns):
        raise RuntimeError("cannot open /srv/secret/run/weights.pt")

    broken.score_columns = score_columns
    with TestClient(create_app(broken, batching=False), raise_server_exceptions=False) as c:
        r = c.post("/predict", json=rows)
    assert r.status_code == 500 and "/srv" not in r.text and "RuntimeError" in r.json()["detail"]


# ---- the port -----------------------------------------------------------------------------------
def test_a_busy_port_exits_2_in_one_line_before_serving(run, capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_main(["--run", str(run / "run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serving" not in err and "http://" not in err, err
    assert f"port {port}" in err and "--port" in err and "in use" in err


def test_bind_takes_any_free_port_with_0():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()
