"""Serving's planned transform (``ctrflow.serve.fast_transform``) equals ``Workflow.transform_frame`` and the
Dask transform bit for bit, for workflows using every ETL op, on random raw rows with nulls, unseen
categories, NaN / inf and empty requests; list ops included; an op without an array path falls back."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrflow.etl import Dataset, Workflow
from ctrflow.etl.ops import (
    Bucketize,
    Categorify,
    Clip,
    FillMissing,
    HashBucket,
    HashedCross,
    Label,
    ListPad,
    ListTruncate,
    LogOp,
    Normalize,
    NormalizeMinMax,
    Operator,
    QuantileBucketize,
    Rename,
)
from ctrflow.serve import Predictor
from ctrflow.serve.fast_transform import FastTransform, Processed
from ctrflow.serve.inputs import to_frame

CATS = ["c1", "c2", "c3", "n1"]  # n1: integer categories
CONTS = ["x1", "x2", "i1"]  # i1: integers with nulls


def _raw(n: int, seed: int, vocab: int = 40) -> dict[str, pa.Array]:
    """Raw columns as serving validates them: strings, int64, float64 (NaN, ±inf), lists, the label."""
    rng = np.random.default_rng(seed)

    def strings(k: int, null: float) -> pa.Array:
        v = [f"v{x}" for x in rng.zipf(1.3, n) % k]
        return pa.array([None if rng.random() < null else s for s in v], pa.string())

    x1 = rng.normal(3, 5, n)
    x1[rng.random(n) < 0.1] = np.nan
    x1[rng.random(n) < 0.03] = np.inf
    x1[rng.random(n) < 0.03] = -np.inf
    x1[rng.random(n) < 0.03] = -0.0
    lens = rng.integers(0, 7, n)
    hist = [None if rng.random() < 0.1 else [f"v{x % vocab}" if rng.random() > 0.05 else None
                                              for x in rng.zipf(1.3, k)] for k in lens]
    nums = [None if rng.random() < 0.1 else [int(x) for x in rng.integers(0, 9, k)] for k in lens]
    wts = [None if h is None else [float(w) for w in rng.random(len(h))] for h in hist]
    return {
        "c1": strings(vocab, 0.1), "c2": strings(vocab * 3, 0.05), "c3": strings(8, 0.0),
        "n1": pa.array([None if rng.random() < 0.1 else int(v) for v in rng.integers(0, 30, n)], pa.int64()),
        "x1": pa.array(x1, pa.float64(), from_pandas=False),
        "x2": pa.array(rng.lognormal(0, 2, n), pa.float64()),
        "i1": pa.array([None if rng.random() < 0.2 else int(v) for v in rng.integers(-5, 100, n)], pa.int64()),
        "hist": pa.array(hist, pa.list_(pa.string())), "nums": pa.array(nums, pa.list_(pa.int64())),
        "hist_weights": pa.array(wts, pa.list_(pa.float64())),
        "label": pa.array(rng.integers(0, 2, n).astype(np.float64)),
    }


class Doubler(Operator):
    """A user's op with only a pandas transform (no array path): served through a frame."""

    def transform(self, columns, df):
        return pd.DataFrame({c: df[c].to_numpy(dtype=np.float64, na_value=np.nan) * 2 for c in columns},
                            index=df.index)


GRAPHS = {
    "criteo": lambda: ((CATS >> Categorify(freq_threshold=2))
                       + (["x1", "x2", "i1"] >> FillMissing() >> Clip(min_value=0) >> LogOp() >> Normalize())
                       + (["label"] >> Label())),
    "categorify": lambda: ((["c1"] >> Categorify(num_buckets=3, freq_threshold=3))
                           + (["c2", "n1"] >> Categorify(max_size=20))
                           + (["c3", "c1"] >> Categorify(encode_type="joint") >> Rename(postfix="_j"))
                           + (["c2"] >> Categorify() >> Rename({"c2": "c2_id"}))),
    "hashing": lambda: ((["c1", "n1", "x1"] >> HashBucket({"c1": 7, "n1": 5, "x1": 11}))
                        + (["c1", "c2"] >> HashedCross(50)) + (["c3", "n1", "i1"] >> HashedCross(13))),
    "numeric": lambda: ((["x1", "i1"] >> FillMissing(fill_val="median", add_binary_cols=True) >> NormalizeMinMax())
                        + (["x2"] >> LogOp() >> Clip(max_value=2.5)) + (["x1"] >> Bucketize([-1, 0, 2.5, 10]))
                        + (["i1", "x2"] >> QuantileBucketize(num_bins=5)) + (["x2"] >> Normalize() >> FillMissing(-1))
                        + (["i1"] >> Normalize() >> Rename(postfix="_n")) + (["x1"] >> Doubler())
                        + (["i1", "x1"] >> FillMissing(0) >> LogOp(signed=True) >> Rename(postfix="_sl"))
                        + (["label"] >> Label(task="regression"))),
    "lists": lambda: ((["hist", "c1"] >> Categorify(vocabulary="items") >> ListTruncate(3) >> ListPad(4))
                      + (["hist", "hist_weights"] >> ListTruncate(2, keep="last") >> Rename(postfix="_t"))
                      + (["nums"] >> HashBucket(6) >> ListPad(3, value=-1)) + (["hist", "c3"] >> HashedCross(17))
                      + (["nums"] >> Categorify(freq_threshold=2)) + ["c2"]),
}


def _fit(graph: str, tmp_path) -> Workflow:
    """Fitted as the ETL fits: on parquet read through ctrflow's readers; saved and loaded, as a server loads it."""
    path = tmp_path / f"{graph}.parquet"
    pq.write_table(pa.table(_raw(3000, 0)), path)
    wf = Workflow(GRAPHS[graph]())
    wf.fit(Dataset(str(path)))
    wf.save(tmp_path / f"wf-{graph}")
    return Workflow.load(tmp_path / f"wf-{graph}")


def _assert_identical(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns, dtypes and values bit for bit (NaN payloads and -0.0 included)."""
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    for c in want.columns:
        a, b = got[c].to_numpy(), want[c].to_numpy()
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            assert a.tobytes() == b.tobytes(), c


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_fast_transform_equals_transform_frame_and_dask(graph, tmp_path, caplog):
    wf = _fit(graph, tmp_path)
    with caplog.at_level(logging.WARNING, logger="ctrflow.serve"):
        fast = FastTransform(wf)
    assert fast.slow_ops == (["Doubler"] if graph == "numeric" else [])
    assert ("Doubler" in caplog.text) == (graph == "numeric")
    for seed, n in ((1, 500), (2, 1), (3, 257), (4, 0)):  # seed 3: a wider vocabulary (unseen values)
        cols = {c: a for c, a in _raw(n, seed, vocab=40 if seed != 3 else 400).items() if c in wf.input_columns}
        got = fast(cols)
        assert isinstance(got, Processed) and len(got) == n
        want = wf.transform_frame(to_frame(cols))
        _assert_identical(got.to_frame(), want)
        if n:
            dask = wf.transform(Dataset(to_frame(cols))).to_ddf().compute().reset_index(drop=True)
            _assert_identical(got.to_frame(), dask)
        some = wf.output_columns[::-2]  # a subset, reordered: only the ops they need run
        _assert_identical(FastTransform(wf, some)(cols).to_frame(), want[some])


def test_unseen_null_and_infinite_values_get_the_offline_ids(tmp_path):
    wf = _fit("criteo", tmp_path)
    cols = {c: a for c, a in _raw(4, 1).items() if c in wf.input_columns}
    cols["c1"] = pa.array(["never-seen", None, "v1", "v1"])
    cols["n1"] = pa.array([10**12, None, 3, -1])
    cols["x1"] = pa.array([np.inf, -np.inf, np.nan, -0.0])
    got = FastTransform(wf)(cols).to_frame()
    assert got["c1"].tolist()[:2] == [2, 1]  # out of vocabulary, null
    _assert_identical(got, wf.transform_frame(to_frame(cols)))


def test_updated_vocabulary_with_retired_values(tmp_path):
    """Values retired by ``Workflow.update(decay=...)`` map to OOV (nulls in the lookup), as offline."""
    wf = _fit("categorify", tmp_path)
    stale = FastTransform(wf)  # planned before the update: its lookup tables no longer answer
    day2 = tmp_path / "day2.parquet"
    pq.write_table(pa.table(_raw(3000, 7, vocab=400)), day2)
    wf.update(Dataset(str(day2)), decay=0.01)
    assert any(op.vocabs[k].num_rows and "retired" in op.vocabs[k].column_names
               for op in wf.ops if isinstance(op, Categorify) for k in op.vocabs)
    cols = {c: a for c, a in _raw(800, 8, vocab=400).items() if c in wf.input_columns}
    want = wf.transform_frame(to_frame(cols))
    _assert_identical(FastTransform(wf)(cols).to_frame(), want)
    got = stale(cols).to_frame()  # the same ids (index_in on the new vocabulary); dtypes as planned
    for c in want.columns:
        np.testing.assert_array_equal(got[c].to_numpy(), want[c].to_numpy())


class _Linear(torch.nn.Module):
    def __init__(self, n_cat: int, n_cont: int) -> None:
        super().__init__()
        self.cat = torch.nn.Parameter(torch.linspace(-1, 1, n_cat))
        self.cont = torch.nn.Parameter(torch.linspace(1, -1, n_cont))

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return (cat.float() % 7 * self.cat).sum(1) + (cont * self.cont).sum(1)


def test_predictor_scores_the_planned_transform_like_the_frame(tmp_path):
    wf = _fit("criteo", tmp_path)
    schema = wf.output_schema()
    pred = Predictor(_Linear(len(schema.categorical), len(schema.continuous)), wf, schema, device="cpu",
                     batch_size=100)
    assert pred.fast is not None and "label" not in pred.fast.outputs  # the model does not read it: not made
    assert "label" not in pred.fast.input_columns and len(pred.fast.steps) < len(FastTransform(wf).steps)
    cols = pred.columns(to_frame({c: a for c, a in _raw(333, 5).items() if c in pred.required_columns}))
    processed = pred.transform_columns(cols)
    assert isinstance(processed, Processed)
    want = pred.predict_processed(pred.transform(to_frame(cols)))
    np.testing.assert_array_equal(pred.predict_processed(processed), want)
    np.testing.assert_array_equal(pred.score_columns(cols), want)
    pred.fast = None  # no plan: the frame path answers
    np.testing.assert_array_equal(pred.score_columns(cols), want)


def test_a_faulty_plan_hands_over_to_the_frame_path(tmp_path, caplog):
    wf = _fit("criteo", tmp_path)
    schema = wf.output_schema()
    pred = Predictor(_Linear(len(schema.categorical), len(schema.continuous)), wf, schema, device="cpu")
    cols = pred.columns(to_frame({c: a for c, a in _raw(50, 5).items() if c in pred.required_columns}))
    want = pred.score_columns(cols)

    def broken(columns):
        raise KeyError("a bug")

    pred.fast = broken
    with caplog.at_level(logging.ERROR, logger="ctrflow.serve"):
        np.testing.assert_array_equal(pred.score_columns(cols), want)
    assert pred.fast is None and "transform_frame serves from now on" in caplog.text


BODIES = [b'[{"a": 1, "b": "x", "c": 2.5}]', b'[{"a": NaN, "b": null}]', b'[1e400, -1e400, -0.0, 1e-5, 5e-324]',
          b'{"a": 1, "a": 2}', b'[18446744073709551617, "12345678901234567890123", 9223372036854775807]',
          b'"\\u00e9\\ud83d\\ude00"', b'"\\ud800"', b'\xef\xbb\xbf[1]', b'[1,]', b'{"rows": [{"x": [1, 2]}]}',
          b'[' * 5000 + b']' * 5000]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_request_bodies_parse_alike_with_and_without_orjson(body, monkeypatch):
    import ctrflow.serve.app as app

    def parse() -> str:
        try:
            return repr(app.loads_json(body))
        except (ValueError, RecursionError) as e:
            return type(e).__name__
    if app.orjson is None:
        pytest.skip("orjson is not installed")
    fast = parse()
    monkeypatch.setattr(app, "orjson", None)
    assert fast == parse()


_BIG = 2**60 + 1  # not exact in float64


@pytest.mark.parametrize("values", [
    [1, 2, None, -3], [1.0, 2.0, None, float("nan")], [1, 2.5, None], [3.0, 4, -0.0], [_BIG, 3.0], [_BIG, 3],
    [2.0**60, 1.0], [2.0**63], [1e300], [1.0, True], [True, 1.0], [1, True], [1.0, float("inf")],
    [float("-inf"), None], [None, None], ["a", None, float("nan")], ["a", 1], [b"x", "a"], ["1", 2.0], [" 7 ", None],
    ["", 1.5], [{"a": 1}], [[1], 2], [np.float32(1.5), 2.0], [np.int64(3), 4], ["\ud800"], ["é", None],
])
@pytest.mark.parametrize("target", [pa.int64(), pa.float64(), pa.string()])
def test_the_inferring_conversion_gives_the_checked_paths_column_or_error(values, target, monkeypatch):
    """``column_array``'s first try (arrow's inference) changes no value and no error of the checked path."""
    from ctrflow.serve import inputs
    from ctrflow.serve.values import ServeError

    def convert() -> tuple[str, object]:
        try:
            arr = inputs.column_array("c", list(values), target)
            return "ok", (arr.type, arr.to_pylist(), arr.null_count)
        except ServeError as e:
            return "error", str(e)

    fast = convert()
    monkeypatch.setattr(inputs, "_inferred", lambda values, target: None)
    checked = convert()
    if target == pa.int64() and isinstance(values[0], np.int64):  # the one change: numpy ints are numbers
        assert checked == ("error", "column 'c' row 0: expected a number, got int64")
        assert fast == ("ok", (pa.int64(), [3, 4], 0))
        return
    assert repr(fast) == repr(checked)  # repr: -0.0 and NaN compare as written
