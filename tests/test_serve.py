"""ctrflow.serve: raw rows scored online equal the training-time scores; the HTTP API rejects bad input
with a 4xx naming the field; /rank sorts /predict's scores. One tiny ETL + 20-step DLRM per module."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl import Dataset, synthetic
from ctrflow.etl.run import main as etl_main
from ctrflow.loader.loader import Loader
from ctrflow.serve import Predictor, RunError, ServeError
from ctrflow.serve.__main__ import main as serve_main
from ctrflow.serve.inputs import frame_from_records
from ctrflow.train.fit import main as fit_main

fastapi = pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette's note about httpx versions, not about this code
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from ctrflow.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, raw valid parquet dir, processed dataset dir) of a tiny generated-data training run."""
    root = tmp_path_factory.mktemp("serve")
    synthetic.generate(str(root / "raw"), rows=4000, seed=3, part_rows=4000)
    assert etl_main(["--input", str(root / "raw" / "train"), "--valid", str(root / "raw" / "valid"),
                     "--output", str(root / "proc"), "--no-progress"]) == 0
    assert fit_main(["--data", str(root / "proc"), "--out", str(root / "run"), "--max-steps", "20",
                     "--batch-size", "256", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
                     "--no-progress", "--no-loader-bench", "--threads", "1", "--lr", "0.01"]) == 0
    return root / "run", root / "raw" / "valid", root / "proc"


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_run(run[0], device="cpu")


@pytest.fixture(scope="module")
def raw(run):
    return pq.read_table(run[1]).to_pandas()  # numpy dtypes, ints with nulls as float64: not what the ETL read


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_rows=300, max_bytes=200_000)) as c:
        yield c


JSON = {"content-type": "application/json"}  # what httpx's json= sets; content= sends no type


def _records(raw: pd.DataFrame, n: int) -> list[dict]:
    """Rows as a JSON client sends them (null for missing values, no label)."""
    return json.loads(raw.drop(columns=["label"]).head(n).to_json(orient="records"))


def _training_scores(predictor: Predictor, proc_dir) -> np.ndarray:
    """The model on the ETL's processed validation parquet, batched by the training loader."""
    out = []
    with torch.inference_mode(), Loader(proc_dir / "valid", 128, shuffle=False) as loader:
        for b in loader:
            out.append(torch.sigmoid(predictor.model(b.categorical, b.continuous).float().reshape(-1)))
    return torch.cat(out).numpy()


# ---- Predictor ----------------------------------------------------------------------------------
def test_raw_rows_score_like_the_processed_rows_in_training(predictor, run, raw):
    expected = _training_scores(predictor, run[2])
    assert len(expected) == len(raw) > 300
    np.testing.assert_allclose(predictor.predict(raw), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(predictor.predict(_records(raw, len(raw))), expected, atol=1e-5, rtol=0)
    small = Predictor(predictor.model, predictor.workflow, predictor.schema, device="cpu", batch_size=37)
    np.testing.assert_allclose(small.predict(raw), expected, atol=1e-5, rtol=0)


def test_amp_scores_the_same_transform_in_bf16(predictor, run, raw):
    # --amp: the model under bf16 autocast, the transform untouched: close to fp32, not equal (it ran in bf16).
    amp = Predictor.from_run(run[0], device="cpu", amp=True)
    assert amp.amp and amp.metadata()["model"]["amp"] and not predictor.metadata()["model"]["amp"]
    fp32, bf16 = predictor.predict(raw), amp.predict(raw)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, atol=2e-2, rtol=0)
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.99


def test_transform_frame_is_the_etl_transform(predictor, run):
    arrow_read = Dataset(str(run[1]), engine="parquet")
    offline = predictor.workflow.transform(arrow_read).to_ddf().compute().reset_index(drop=True)
    online = predictor.workflow.transform_frame(arrow_read.to_ddf().compute()).reset_index(drop=True)
    pd.testing.assert_frame_equal(online, offline)
    processed = pq.read_table(run[2] / "valid").to_pandas()
    for c in predictor.categorical + predictor.continuous:
        np.testing.assert_array_equal(online[c].to_numpy(), processed[c].to_numpy())


def test_unseen_category_maps_to_the_oov_id(predictor, raw):
    rows = _records(raw, 3)
    rows[1]["C1"] = "never-seen-in-training"
    rows[2]["C1"] = None
    processed = predictor.transform(predictor.raw_frame(rows))
    assert processed["C1"].tolist()[1:] == [2, 1]  # OOV, null
    assert processed["C1"].iloc[0] >= 3
    np.testing.assert_allclose(predictor.predict(rows), predictor.predict_processed(processed), atol=1e-6)


def test_rank_sorts_the_predict_scores(predictor, raw):
    context = {c: v for c, v in _records(raw, 1)[0].items() if c.startswith("I")}
    candidates = [{c: v for c, v in r.items() if c.startswith("C")} for r in _records(raw, 40)]
    ranked = predictor.rank(context, candidates)
    scores = predictor.predict([{**context, **c} for c in candidates])
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable"))
    assert [s for _, s in ranked] == sorted(scores.tolist(), reverse=True)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda rows: [{k: v for k, v in r.items() if k != "I3"} for r in rows], "I3", "missing column 'I3'"),
    (lambda rows: rows[:1] + [{k: v for k, v in rows[1].items() if k != "C7"}], "C7", "rows[1] is missing"),
    (lambda rows: [{**rows[0], "I2": "abc"}], "I2", "'abc' is not a number"),
    (lambda rows: [{**rows[0], "I2": True}], "I2", "expected a number"),
    (lambda rows: [{**rows[0], "I2": [1]}], "I2", "expected a number"),
    (lambda rows: [{**rows[0], "I4": float("inf")}], "I4", "not a finite number"),
    (lambda rows: [{**rows[0], "I4": 2.5}], "I4", "not an integer"),
    (lambda rows: [{**rows[0], "C2": 1.5}], "C2", "expected a string"),
    (lambda rows: [{**rows[0], "C2": {"a": 1}}], "C2", "expected a string"),
    (lambda rows: [], "rows", "empty"),
    (lambda rows: [rows[0], 5], "rows[1]", "must be an object"),
    (lambda rows: {"I1": 1}, "rows", "JSON list"),
])
def test_bad_rows_raise_serve_error_naming_the_field(predictor, raw, mutate, field, words):
    with pytest.raises(ServeError) as e:
        predictor.predict(mutate(_records(raw, 2)))
    assert e.value.field == field and words in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_lenient_parsing_matches_typed_values(predictor, raw):
    rows = _records(raw, 2)
    as_text = [{k: (str(v) if isinstance(v, (int, float)) else v) for k, v in r.items()} for r in rows]
    as_text[0]["I5"] = ""  # an empty field is missing, as in Criteo text
    rows[0]["I5"] = None
    np.testing.assert_array_equal(predictor.predict(as_text), predictor.predict(rows))


def test_dataframe_with_a_bad_value_names_the_column(predictor, raw):
    bad = raw.head(4).copy()
    bad["I6"] = bad["I6"].astype(object)
    bad.loc[2, "I6"] = "n/a"
    with pytest.raises(ServeError, match=r"column 'I6' row 2: 'n/a' is not a number"):
        predictor.predict(bad)
    with pytest.raises(ServeError, match="missing column"):
        predictor.predict(raw.drop(columns=["C9"]))
    with pytest.raises(ServeError, match="empty"):
        predictor.predict(raw.head(0))


def test_frame_from_records_types():
    types = {"c": pa.string(), "i": pa.int64(), "x": pa.float64()}
    df = frame_from_records([{"c": 7, "i": "12", "x": "1e3"}, {"c": "a", "i": 3.0, "x": None}], types)
    assert df["c"].tolist() == ["7", "a"] and df["i"].tolist() == [12, 3]
    assert df["x"].iloc[0] == 1000.0 and pd.isna(df["x"].iloc[1])


def test_from_run_errors(run, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        Predictor.from_run(tmp_path / "nope")
    with pytest.raises(RunError, match="no checkpoints"):
        Predictor.from_run(tmp_path)
    with pytest.raises(RunError, match="gone"):
        Predictor.from_run(run[0], data_dir=str(tmp_path / "moved"))


def test_a_model_smaller_than_the_workflow_is_refused(predictor):
    from ctrflow.models import DLRM

    cfg = dict(predictor.model.config, cardinalities=[3] * len(predictor.categorical))
    with pytest.raises(RunError, match="workflow updated after training"):
        Predictor(DLRM(**cfg), predictor.workflow, predictor.schema, device="cpu")


def test_cli_bad_run_dir_exits_2_with_one_line(tmp_path, capsys):
    assert serve_main(["--run", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run directory") and "\n" not in err
    assert serve_main(["--run", str(tmp_path), "--max-rows", "0"]) == 2
    assert serve_main([]) == 2


def test_batcher_scores_like_single_requests_and_isolates_a_bad_one(predictor, raw):
    from concurrent.futures import Future

    from ctrflow.serve.batcher import Batcher

    requests = [predictor.columns(_records(raw.iloc[i * 7:], 5 + i)) for i in range(4)]
    bad = {c: a for c, a in requests[1].items() if c != "C1"}  # fails the transform alone too
    batcher = Batcher(predictor)
    try:
        futures = [Future() for _ in range(5)]
        batcher._score(list(zip([*requests, bad], futures, strict=True)))  # one batch, deterministically
        for cols, fut in zip(requests, futures[:4], strict=True):
            np.testing.assert_allclose(fut.result(), predictor.score_columns(cols), atol=1e-6)
        with pytest.raises(ServeError, match="C1"):
            futures[-1].result()
        queued = [batcher.submit(cols) for cols in requests]  # through the worker thread
        for cols, fut in zip(requests, queued, strict=True):
            np.testing.assert_allclose(fut.result(timeout=60), predictor.score_columns(cols), atol=1e-6)
    finally:
        batcher.close()
    assert batcher.requests == 9 and 2 <= batcher.batches <= 5


# ---- HTTP ---------------------------------------------------------------------------------------
def test_health_metadata_and_docs(client, predictor):
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["model"]["class"] == "DLRM" and meta["model"]["task"] == "binary"
    assert meta["schema"]["format"] == "ctrflow.processed/1"
    assert "I1" in meta["workflow"]["required_columns"] and "label" not in meta["workflow"]["required_columns"]
    assert meta["versions"]["serving"]["torch"] and meta["limits"]["max_rows"] == 300
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_random_garbage_never_gets_a_500(client, raw):
    rng = np.random.default_rng(0)
    one = _records(raw, 1)[0]
    values = [None, 0, -1, 2**70, 1.5, -1e300, "", " ", "x", "1e5", "NaN", "-inf", True, [], {}, [1, "a"], {"a": None},
              "\u00e9\u4e2d", "C" * 1000]
    cols = list(one)
    for _ in range(100):
        row = dict(one)
        for c in rng.choice(cols, size=3, replace=False):
            row[str(c)] = values[rng.integers(len(values))]
        if rng.random() < 0.2:
            row.pop(str(rng.choice(cols)))
        r = client.post("/predict" if rng.random() < 0.5 else "/rank",
                        json=[row] if rng.random() < 0.5 else {"context": {}, "candidates": [row]})
        assert r.status_code < 500, r.text
        assert r.status_code == 200 or r.json()["detail"], r.text


def test_regression_task_returns_raw_values(predictor, raw):
    rows = _records(raw, 10)
    reg = Predictor(predictor.model, predictor.workflow, predictor.schema, task="regression", device="cpu")
    p = predictor.predict(rows).astype(np.float64)
    np.testing.assert_allclose(reg.predict(rows), np.log(p / (1 - p)), atol=1e-4)


def test_app_without_batching(predictor, raw):
    rows = _records(raw, 20)
    with TestClient(create_app(predictor, batching=False)) as c:
        r = c.post("/predict", json=rows)
        assert r.status_code == 200 and c.get("/metadata").json()["batching"]["enabled"] is False
        assert c.post("/predict", json=[{"I1": 1}]).status_code == 422
    np.testing.assert_allclose(r.json()["scores"], predictor.predict(rows), atol=1e-6)


def test_predict_endpoint_matches_predictor(client, predictor, raw):
    rows = _records(raw, 50)
    r = client.post("/predict", json=rows)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], predictor.predict(rows), atol=1e-6)
    first = client.post("/predict", json={"rows": rows[:3]}).json()["scores"]
    np.testing.assert_allclose(first, r.json()["scores"][:3], atol=1e-6)  # another batch size: other blocking
    nan_row = json.dumps(rows[:1]).replace("null", "NaN")  # Python's json.dumps of a missing float
    assert client.post("/predict", content=nan_row, headers=JSON).status_code == 200


def test_rank_endpoint_order_equals_sorted_predict(client, raw):
    rows = _records(raw, 30)
    context = {c: v for c, v in rows[0].items() if c.startswith("I")}
    candidates = [{c: v for c, v in r.items() if c.startswith("C")} for r in rows]
    ranked = client.post("/rank", json={"context": context, "candidates": candidates}).json()["ranked"]
    scores = client.post("/predict", json=[{**context, **c} for c in candidates]).json()["scores"]
    assert [x["index"] for x in ranked] == sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    assert [x["score"] for x in ranked] == sorted(scores, reverse=True)
    assert all(x["candidate"] == candidates[x["index"]] for x in ranked)


def _bad_requests(rows: list[dict]) -> list[tuple[str, dict, int, str]]:
    one = rows[0]
    return [
        ("/predict", {"content": b"[{\"I1\": 1,"}, 400, "body"),
        ("/predict", {"content": b""}, 400, "body"),
        ("/predict", {"content": b"\xff\xfe"}, 400, "body"),
        ("/predict", {"json": []}, 422, "rows"),
        ("/predict", {"json": {"I1": 1}}, 422, "rows"),
        ("/predict", {"json": [one, "x"]}, 422, "rows[1]"),
        ("/predict", {"json": [{k: v for k, v in one.items() if k != "C3"}]}, 422, "C3"),
        ("/predict", {"json": [{**one, "I1": "twelve"}]}, 422, "I1"),
        ("/predict", {"json": [{**one, "C1": [1, 2]}]}, 422, "C1"),
        ("/predict", {"content": json.dumps([{**one, "I1": "Infinity"}])}, 422, "I1"),
        ("/predict", {"content": b"[" * 50_000 + b"]" * 50_000}, 400, "body"),
        ("/predict", {"content": json.dumps([{**one, "C4": "\ud800"}])}, 422, "C4"),
        ("/predict", {"content": json.dumps([{**one, "I5": 1e300}])}, 422, "I5"),
        ("/predict", {"content": b"null"}, 422, "rows"),
        ("/predict", {"json": [one] * 301}, 413, "rows"),
        ("/predict", {"content": b"[" + b" " * 200_001 + b"]"}, 413, "body"),
        ("/rank", {"json": [one]}, 422, "body"),
        ("/rank", {"json": {"context": one}}, 422, "candidates"),
        ("/rank", {"json": {"context": one, "candidates": []}}, 422, "candidates"),
        ("/rank", {"json": {"context": one, "candidates": {"a": 1}}}, 422, "candidates"),
        ("/rank", {"json": {"context": [1], "candidates": [one]}}, 422, "context"),
        ("/rank", {"json": {"context": {}, "candidates": [{"C1": "a"}]}}, 422, "I1"),
        ("/rank", {"json": {"context": one, "candidates": [{"I2": "x"}]}}, 422, "I2"),
        ("/rank", {"json": {"context": one, "candidates": [{}] * 301}}, 413, "candidates"),
    ]


def test_bad_requests_get_a_4xx_naming_the_field(client, raw):
    for path, kwargs, status, field in _bad_requests(_records(raw, 1)):
        r = client.post(path, **kwargs, headers=JSON)
        assert r.status_code == status, (path, kwargs.keys(), r.status_code, r.text)
        body = r.json()
        assert body["field"] == field, (path, body)
        assert isinstance(body["detail"], str) and body["detail"], body
        if field != "body":
            assert field in body["detail"], body
    assert client.get("/health").status_code == 200  # still up
    assert client.get("/predict").status_code == 405


def test_the_best_checkpoint_is_served(run, tmp_path):
    # A run that kept best.pt is served from it (what the run reported), not from its newest checkpoint.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    assert (copy / "best.pt").exists()
    assert Predictor.from_run(copy, device="cpu").info["checkpoint"].endswith("best.pt")
    (copy / "best.pt").unlink()
    assert "ckpt-" in Predictor.from_run(copy, device="cpu").info["checkpoint"]


def test_a_regression_run_is_served_in_the_targets_units(tmp_path):
    # The trainer learns a range-squashed target (ctrflow.train.target); serving applies the same transform.
    root = tmp_path
    synthetic.generate(str(root / "raw"), rows=3000, seed=5, part_rows=3000)
    for split in ("train", "valid"):  # a rating-like label: 1..5
        for f in (root / "raw" / split).glob("*.parquet"):
            t = pq.read_table(f).to_pandas()
            t["label"] = (t["I2"].fillna(0).clip(0, 4) + 1).round().astype("float64")
            t.to_parquet(f)
    assert etl_main(["--input", str(root / "raw" / "train"), "--valid", str(root / "raw" / "valid"), "--task",
                     "regression", "--output", str(root / "proc"), "--no-progress"]) == 0
    assert fit_main(["--data", str(root / "proc"), "--out", str(root / "run"), "--max-steps", "10",
                     "--batch-size", "256", "--embedding-dim", "4", "--layers", "16", "--bottom-layers", "8",
                     "--no-progress", "--no-loader-bench", "--threads", "1"]) == 0
    p = Predictor.from_run(root / "run", device="cpu")
    raw = pq.read_table(root / "raw" / "valid").to_pandas()
    scores = p.predict(raw.drop(columns=["label"]))
    lo, hi = p.info["target"]["y_range"]
    assert (lo, hi) == (0.5, 5.5) and ((scores > lo) & (scores < hi)).all()
