"""ctrflow.serve with list (sequence) features: raw rows holding JSON arrays / delimited strings score like
the loader's batches of the ETL output; bad list values get a 4xx naming the field. One tiny ETL (hist_items
sharing item_id's vocabulary and table, tags split from '|'-strings with tags_weights, lists truncated
to 12) + a 20-step DLRM per module."""

from __future__ import annotations

import json
import warnings
from concurrent.futures import Future

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl import synthetic
from ctrflow.etl.run import main as etl_main
from ctrflow.loader.loader import Loader
from ctrflow.serve import Predictor, ServeError
from ctrflow.serve.batcher import Batcher
from ctrflow.serve.inputs import arrow_type
from ctrflow.train.fit import main as fit_main

fastapi = pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette's note about httpx versions, not about this code
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from ctrflow.serve import create_app  # noqa: E402

JSON = {"content-type": "application/json"}  # content= sends no type; the server wants JSON
FEATURES = """
[features.item_id]
shared = "items"
[features.hist_items]
shared = "items"
combiner = "mean"
[features.tags]
combiner = "sum"
"""
MAX_LEN = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, raw valid parquet dir, processed dataset dir) of a tiny training run with list features."""
    root = tmp_path_factory.mktemp("serve_lists")
    synthetic.generate(str(root / "raw"), rows=4000, seed=5, part_rows=4000, sequences=True)
    for f in (root / "raw").glob("*/*.parquet"):  # tags as the delimited strings of a text log
        t = pq.read_table(f)
        joined = pc.binary_join(t["tags"].combine_chunks().cast(pa.list_(pa.string())), "|")
        pq.write_table(t.set_column(t.schema.get_field_index("tags"), "tags", joined), f)
    assert etl_main(["--input", str(root / "raw" / "train"), "--valid", str(root / "raw" / "valid"),
                     "--output", str(root / "proc"), "--list-cols", "hist_items,tags:|",
                     "--joint-vocab", "items=item_id,hist_items", "--list-max-len", str(MAX_LEN),
                     "--no-progress"]) == 0
    (root / "features.toml").write_text(FEATURES)
    assert fit_main(["--data", str(root / "proc"), "--out", str(root / "run"), "--max-steps", "20",
                     "--features", str(root / "features.toml"), "--batch-size", "256", "--embedding-dim", "4",
                     "--layers", "16", "--bottom-layers", "8", "--no-progress", "--no-loader-bench",
                     "--threads", "1", "--lr", "0.01"]) == 0
    return root / "run", root / "raw" / "valid", root / "proc"


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_run(run[0], device="cpu")


@pytest.fixture(scope="module")
def raw(run):
    return pq.read_table(run[1]).to_pandas()  # lists as numpy arrays in object columns, tags as strings


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_rows=300, max_bytes=400_000)) as c:
        yield c


def _records(raw: pd.DataFrame, n: int, tags_as_lists: bool = False) -> list[dict]:
    """Rows as a JSON client sends them: lists as arrays, tags as '|'-strings (or arrays), no label."""
    rows = json.loads(raw.drop(columns=["label"]).head(n).to_json(orient="records", double_precision=15))
    if tags_as_lists:
        rows = [{**r, "tags": r["tags"].split("|") if r["tags"] else []} for r in rows]
    return rows


def _training_scores(predictor: Predictor, proc_dir) -> np.ndarray:
    """The model on the ETL's processed validation parquet, batched by the training loader (as the trainer)."""
    out = []
    with torch.inference_mode(), Loader(proc_dir / "valid", 128, shuffle=False, lists=predictor.lists) as loader:
        for b in loader:
            logits = predictor.model(b.categorical, b.continuous, lists=b.lists, weights=b.weights)
            out.append(torch.sigmoid(logits.float().reshape(-1)))
    return torch.cat(out).numpy()


# ---- Predictor ----------------------------------------------------------------------------------
def test_the_run_has_a_shared_sequence_feature_and_a_weighted_list(predictor, raw):
    spec = {f.name: f for f in predictor.model.features.spec.features}
    assert spec["hist_items"].kind == "list" and spec["hist_items"].table == spec["item_id"].table == "items"
    assert spec["tags"].weights == "tags_weights" and predictor.list_weights == {"tags": "tags_weights"}
    assert predictor.lists == ["hist_items", "tags"] and predictor.separators == {"tags": "|"}
    assert max(len(h) for h in raw["hist_items"]) > MAX_LEN  # the truncation is exercised


def test_raw_list_rows_score_like_the_loader_batches(predictor, run, raw):
    expected = _training_scores(predictor, run[2])
    assert len(expected) == len(raw) == 400
    np.testing.assert_allclose(predictor.predict(raw), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(predictor.predict(_records(raw, 400)), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(predictor.predict(_records(raw, 400, tags_as_lists=True)), expected, atol=1e-6, rtol=0)
    small = Predictor(predictor.model, predictor.workflow, predictor.schema, device="cpu", batch_size=37)
    np.testing.assert_allclose(small.predict(raw), expected, atol=1e-6, rtol=0)


def test_list_transform_is_the_etl_output(predictor, run, raw):
    processed = predictor.transform(predictor.raw_frame(raw))
    written = pq.read_table(run[2] / "valid")
    for c in ["item_id", "hist_items", "tags", "tags_weights"]:
        typed = pa.Array.from_pandas(processed[c]).cast(written.schema.field(c).type)
        assert typed.to_pylist() == written[c].to_pylist(), c
    assert max(len(x) for x in written["hist_items"].to_pylist()) == MAX_LEN


def test_a_model_without_list_features_still_serves_the_list_workflow(predictor, run, raw):
    from ctrflow.models import DLRM

    torch.manual_seed(0)
    plain = DLRM.from_schema(run[2], embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    p = Predictor(plain, predictor.workflow, predictor.schema, device="cpu")
    assert p.lists == [] and "hist_items" in p.required_columns  # the workflow still reads the lists
    with torch.inference_mode(), Loader(run[2] / "valid", 400, shuffle=False, lists=[]) as loader:
        b = next(iter(loader))
        expected = torch.sigmoid(plain(b.categorical, b.continuous).reshape(-1)).numpy()
    np.testing.assert_allclose(p.predict(_records(raw, 400)), expected, atol=1e-6)


def test_a_list_table_smaller_than_the_workflow_is_refused(predictor):
    from ctrflow.models import DLRM
    from ctrflow.serve import RunError

    cfg = json.loads(json.dumps(predictor.model.config))
    for f in cfg["features"]["features"]:
        if f["name"] == "tags":
            f["cardinality"] = 5
    with pytest.raises(RunError, match="column 'tags'.*workflow updated after training"):
        Predictor(DLRM(**cfg), predictor.workflow, predictor.schema, device="cpu")


def test_weights_reach_the_model(predictor, raw):
    rows = _records(raw, 4, tags_as_lists=True)
    heavier = [{**r, "tags_weights": [3 * w for w in r["tags_weights"]]} for r in rows]
    assert not np.allclose(predictor.predict(rows), predictor.predict(heavier))


def test_empty_null_and_unseen_list_values(predictor, raw):
    rows = _records(raw, 5)
    rows[0].update(hist_items=[], tags=[], tags_weights=[])
    rows[1] = {**rows[0], "hist_items": None, "tags": None, "tags_weights": None}
    rows[2].update(tags="", tags_weights=[])  # an empty delimited string is an empty list (the ETL's split)
    rows[3].update(hist_items=[999_999_999_999, None, rows[3]["hist_items"][0]])
    rows[4].update(tags="||a-tag-never-seen||", tags_weights=[0.5])
    processed = predictor.transform(predictor.raw_frame(rows))
    hist, tags = processed["hist_items"].tolist(), processed["tags"].tolist()
    assert [len(x) for x in hist[:2]] == [0, 0] and [len(x) for x in tags[:3]] == [0, 0, 0]
    assert list(hist[3][:2]) == [2, 1] and hist[3][2] >= 3  # OOV, null element, a known item
    assert list(tags[4]) == [2]
    scores = predictor.predict(rows)
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # a null list is an empty list
    np.testing.assert_allclose(scores, predictor.predict_processed(processed), atol=1e-6)


def _bad_list_rows(one: dict) -> list[tuple[dict, str, str]]:
    """(row, field, words of the message) of list values the predictor must refuse."""
    n = len(one["tags"].split("|"))
    return [
        ({**one, "hist_items": 5}, "hist_items", "expected a list (a JSON array), got int"),
        ({**one, "hist_items": "1|2"}, "hist_items", "expected a list (a JSON array), got a string"),
        ({**one, "hist_items": {"a": 1}}, "hist_items", "got an object"),
        ({**one, "hist_items": [1, "x"]}, "hist_items", "row 0 element 1: 'x' is not a number"),
        ({**one, "hist_items": [1, [2]]}, "hist_items", "element 1: expected a number, got a list"),
        ({**one, "hist_items": [1.5]}, "hist_items", "element 0: 1.5 is not an integer"),
        ({**one, "hist_items": [True]}, "hist_items", "expected a number, got a boolean"),
        ({**one, "hist_items": [2**64]}, "hist_items", "does not fit int64"),
        ({**one, "tags": 7}, "tags", "expected a list (a JSON array or a '|'-separated string)"),
        ({**one, "tags": [{"a": 1}]}, "tags", "element 0: expected a string"),
        ({**one, "tags_weights": [0.5] * (n + 1)}, "tags_weights", f"{n + 1} weight(s) for the {n} element(s)"),
        ({**one, "tags_weights": None}, "tags_weights", f"0 weight(s) for the {n} element(s) of 'tags'"),
        ({**one, "tags_weights": [None] * n}, "tags_weights", "a weight is null"),
        ({**one, "tags_weights": ["heavy"] * n}, "tags_weights", "'heavy' is not a number"),
        ({**one, "tags_weights": [float("inf")] * n}, "tags_weights", "not a finite number"),
        ({**one, "tags_weights": 0.5}, "tags_weights", "expected a list"),
        ({**one, "item_id": [1, 2]}, "item_id", "expected a number, got a list"),
        ({k: v for k, v in one.items() if k != "tags_weights"}, "tags_weights", "missing column 'tags_weights'"),
    ]


def test_bad_list_values_raise_serve_error_naming_the_field(predictor, raw):
    for row, field, words in _bad_list_rows(_records(raw, 1)[0]):
        with pytest.raises(ServeError) as e:
            predictor.predict([row])
        assert e.value.field == field and words in str(e.value), (field, str(e.value))


def test_dataframe_with_bad_lists_names_the_column(predictor, raw):
    bad = raw.head(4).copy()
    bad.at[2, "hist_items"] = "n/a"
    with pytest.raises(ServeError, match=r"column 'hist_items' row 2: expected a list"):
        predictor.predict(bad)
    short = raw.head(4).copy()
    short.at[1, "tags_weights"] = np.zeros(0, np.float32)
    with pytest.raises(ServeError, match=r"column 'tags_weights' row 1: 0 weight\(s\)"):
        predictor.predict(short)
    as_lists = raw.head(50).copy()  # python lists of strings instead of the delimited form
    as_lists["tags"] = [t.split("|") if t else [] for t in as_lists["tags"]]
    np.testing.assert_allclose(predictor.predict(as_lists), predictor.predict(raw.head(50)), atol=1e-6)


def test_arrow_type_of_recorded_list_dtypes():
    assert arrow_type("list<item: int64>[pyarrow]") == pa.list_(pa.int64())
    assert arrow_type("list<item: string>[pyarrow]") == pa.list_(pa.string())
    assert arrow_type("list<element: double>") == pa.list_(pa.float64())
    assert arrow_type("large_list<item: dictionary<values=string, indices=int32>>") == pa.list_(pa.string())
    assert arrow_type("int64[pyarrow]") == pa.int64()


def test_batcher_stacks_list_requests(predictor, raw):
    requests = [predictor.columns(_records(raw.iloc[i * 9:], 3 + i)) for i in range(3)]
    batcher = Batcher(predictor)
    try:
        futures = [Future() for _ in requests]
        batcher._score(list(zip(requests, futures, strict=True)))
        for cols, fut in zip(requests, futures, strict=True):
            np.testing.assert_allclose(fut.result(), predictor.score_columns(cols), atol=1e-6)
    finally:
        batcher.close()
    assert batcher.batches == 1


# ---- HTTP ---------------------------------------------------------------------------------------
def test_predict_and_rank_endpoints_take_list_columns(client, predictor, raw):
    rows = _records(raw, 40)
    r = client.post("/predict", json=rows)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], predictor.predict(raw.head(40)), atol=1e-6)
    user = {"hist_items", "tags", "tags_weights"} | {f"I{i}" for i in range(1, 14)}
    context = {c: v for c, v in rows[0].items() if c in user}  # the user's history and interests
    candidates = [{c: v for c, v in row.items() if c not in user} for row in rows]  # item_id and C*
    ranked = client.post("/rank", json={"context": context, "candidates": candidates})
    assert ranked.status_code == 200, ranked.text
    scores = predictor.predict([{**context, **c} for c in candidates])
    got = ranked.json()["ranked"]
    assert [x["index"] for x in got] == sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    np.testing.assert_allclose([x["score"] for x in got], np.sort(scores)[::-1], atol=1e-6)


def test_bad_list_requests_get_a_422_naming_the_field(client, raw):
    one = _records(raw, 1)[0]
    for row, field, _ in _bad_list_rows(one):
        for path, body in (("/predict", [row]), ("/rank", {"context": {}, "candidates": [row]})):
            r = client.post(path, content=json.dumps(body), headers=JSON)  # json.dumps: Infinity as Python writes it
            assert r.status_code == 422, (path, field, r.text)
            assert r.json()["field"] == field and field in r.json()["detail"], r.json()
    r = client.post("/rank", json={"context": {"hist_items": "not a list"}, "candidates": [one]})
    assert r.status_code == 200  # a candidate's own value wins over the context's
    r = client.post("/rank", json={"context": {**one, "tags_weights": [1.0]}, "candidates": [{"C1": "x"}]})
    assert r.status_code == 422 and r.json()["field"] == "tags_weights"


def test_list_garbage_never_gets_a_500(client, raw):
    rng = np.random.default_rng(1)
    one = _records(raw, 1)[0]
    values = [None, [], [None], [1, "a"], [[1]], [{}], ["x"] * 3, [2**70], [1e300], [-1.5, 2.5], "", "a|b|", "|",
              5, {"a": [1]}, [True, False], ["\u00e9"] * 2, list(range(200))]
    lists = ["hist_items", "tags", "tags_weights", "item_id"]
    for _ in range(60):
        row = dict(one)
        for c in rng.choice(lists, size=2, replace=False):
            row[str(c)] = values[rng.integers(len(values))]
        r = client.post("/predict", json=[row])
        assert r.status_code < 500, r.text
        assert r.status_code == 200 or r.json()["detail"], r.text


def test_metadata_lists_the_list_columns(client):
    meta = client.get("/metadata").json()
    lists = meta["workflow"]["list_columns"]
    assert set(lists) == {"hist_items", "tags", "tags_weights"}
    assert lists["tags"] == {"type": "list<item: string>", "separator": "|", "weights": "tags_weights",
                             "weights_of": None}
    assert lists["hist_items"]["type"] == "list<item: int64>" and lists["hist_items"]["separator"] is None
    assert lists["tags_weights"]["weights_of"] == "tags"
    assert meta["workflow"]["model_inputs"]["lists"] == ["hist_items", "tags"]
    assert meta["workflow"]["model_inputs"]["list_weights"] == {"tags": "tags_weights"}
    assert {"hist_items", "tags", "tags_weights"} <= set(meta["workflow"]["required_columns"])
    kinds = {c["name"]: c["kind"] for c in meta["schema"]["columns"]}
    assert kinds["hist_items"] == kinds["tags"] == "list"
