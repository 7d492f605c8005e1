"""Workflow: graph building, one ``dask.compute`` per dependency level, save / load, embedding sizes."""

from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import ColumnSelector, Dataset, Workflow, get_embedding_sizes, readers
from ctrflow.etl.graph import Node
from ctrflow.etl.ops import (
    Bucketize,
    Categorify,
    Clip,
    FillMissing,
    HashBucket,
    HashedCross,
    Label,
    LogOp,
    Normalize,
    NormalizeMinMax,
    QuantileBucketize,
    Rename,
)
from ctrflow.etl.readers import DatasetError
from ctrflow.etl.schema import embedding_dim
from ctrflow.etl.workflow import WorkflowError


def make_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    s = rng.choice(["a", "b", "c", "dd", "é", "日本", ""], n, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]).astype(object)
    s[rng.random(n) < 0.1] = None
    i = pd.array(rng.integers(0, 30, n), dtype="Int64")
    i[rng.random(n) < 0.1] = pd.NA
    x = rng.normal(2.0, 3.0, n)
    x[rng.random(n) < 0.1] = np.nan
    q = rng.exponential(3.0, n)
    return pd.DataFrame({"s": s, "t": rng.choice(["u", "v", "w"], n), "i": i, "x": x, "q": q,
                         "y": rng.integers(0, 2, n)})


def every_op_graph() -> Node:
    """All op kinds, incl. a Categorify that keeps nothing and renamed categoricals."""
    return (
        (["s", "i"] >> Categorify(freq_threshold=3, num_buckets=3))
        + (["t"] >> Categorify(max_size=5) >> Rename(mapping={"t": "t_id"}))
        + (["t"] >> Categorify(freq_threshold=10**6) >> Rename(postfix="_none"))
        + (["x"] >> FillMissing(fill_val="median", add_binary_cols=True) >> Normalize())
        + (["q"] >> Clip(min_value=0.5, max_value=8) >> LogOp() >> NormalizeMinMax() >> Rename(postfix="_mm"))
        + (["x"] >> Bucketize([0.0, 1.0, 5.0]) >> Rename(postfix="_b"))
        + (["q"] >> QuantileBucketize(num_bins=4) >> Rename(postfix="_qb"))
        + (["s"] >> HashBucket(20) >> Rename(postfix="_h"))
        + (["s", "i"] >> HashedCross(30))
        + (["y"] >> Label())
    )


CATEGORICAL_OUTPUTS = ["s", "i", "t_id", "t_none", "x_b", "q_qb", "s_h", "s_X_i"]


# ---- graph building -------------------------------------------------------------------------
def test_graph_building_forms():
    a = ["C1", "C2"] >> Categorify()
    assert isinstance(a, Node) and a.output_columns == ["C1", "C2"]
    b = ColumnSelector(["I1", "I1", "I2"]) >> FillMissing() >> Normalize()  # chaining; duplicates dropped
    assert b.output_columns == ["I1", "I2"] and type(b.op) is Normalize and type(b.parents[0].op) is FillMissing
    assert ColumnSelector("I3").names == ["I3"]
    g = a + b + ["label"]
    assert g.output_columns == ["C1", "C2", "I1", "I2", "label"]
    assert (["label"] + a).output_columns == ["label", "C1", "C2"]  # list on the left of +
    assert ("label" + a).output_columns == ["label", "C1", "C2"]
    assert (ColumnSelector(["z"]) + a).output_columns == ["z", "C1", "C2"]
    assert (a + ColumnSelector(["z"])).output_columns == ["C1", "C2", "z"]
    wf = Workflow(g)
    assert wf.input_columns == ["C1", "C2", "I1", "I2", "label"]
    assert wf.output_columns == g.output_columns
    assert [type(op).__name__ for op in wf.ops] == ["Categorify", "FillMissing", "Normalize"]
    assert not wf.fitted  # it holds stat ops


def test_graph_output_order_follows_concat_order():
    g = (["x"] >> FillMissing(add_binary_cols=True)) + (["c", "a"] >> Categorify()) + (["s", "b"] >> HashedCross(9))
    assert g.output_columns == ["x", "x_filled", "c", "a", "s_X_b"]
    df = pd.DataFrame({"x": [1.0, None], "c": ["p", "q"], "a": ["r", None], "s": ["u", "v"], "b": [1, 2]})
    out = Workflow(g).fit_transform(Dataset(df)).compute()
    assert list(out.columns) == g.output_columns


def test_graph_errors():
    with pytest.raises(TypeError):
        ["a"] >> Node() >> "not an op"  # noqa: B015
    with pytest.raises(TypeError):
        Workflow(5)


def test_workflow_without_stat_ops_is_fitted():
    wf = Workflow(["x"] >> Clip(min_value=0) >> LogOp())
    assert wf.fitted
    out = wf.transform(Dataset(pd.DataFrame({"x": [-1.0, 0.0, 3.0]}))).compute()
    np.testing.assert_allclose(out["x"], np.log1p([0.0, 0.0, 3.0]), rtol=1e-6)


def test_transform_before_fit_and_missing_columns():
    wf = Workflow(["x"] >> Normalize())
    with pytest.raises(RuntimeError, match="fit"):
        wf.transform(Dataset(pd.DataFrame({"x": [1.0]})))
    with pytest.raises(DatasetError, match="x"):
        wf.fit(Dataset(pd.DataFrame({"y": [1.0]})))


def test_passthrough_columns():
    df = pd.DataFrame({"c": ["a", "b", "a"], "label": [0, 1, 0]})
    wf = Workflow((["c"] >> Categorify()) + ["label"])
    out = wf.fit_transform(Dataset(df)).compute()
    assert out["label"].tolist() == [0, 1, 0] and out["c"].tolist() == [3, 4, 3]


# ---- one dask.compute per dependency level ---------------------------------------------------
@pytest.fixture
def count_computes(monkeypatch):
    calls = []
    real = dask.compute

    def counting(*args, **kwargs):
        calls.append(len(args))
        return real(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", counting)
    return calls


LEVEL_GRAPHS = {
    "categorify+normalize": (lambda: (["s"] >> Categorify()) + (["x"] >> Normalize()), 1),
    "fill-median>>normalize": (lambda: ["x"] >> FillMissing(fill_val="median") >> Normalize(), 2),
    "stateless-between": (lambda: ["x"] >> FillMissing("median") >> Clip(min_value=0) >> LogOp() >> Normalize(), 2),
    "three-levels+parallel": (
        lambda: (["x", "q"] >> FillMissing("median") >> Normalize() >> QuantileBucketize(3))
        + (["s", "t"] >> Categorify())
        + (["q"] >> NormalizeMinMax() >> Rename(postfix="_mm")),
        3,
    ),
    "every-op": (every_op_graph, 2),
}


@pytest.mark.parametrize("name", list(LEVEL_GRAPHS))
def test_one_compute_per_level(name, count_computes):
    make_graph, levels = LEVEL_GRAPHS[name]
    wf = Workflow(make_graph())
    assert len(wf._stat_levels()) == levels
    wf.fit(Dataset(make_frame(), part_size=50))
    assert len(count_computes) == levels, count_computes
    stat_ops = [op for op in wf.ops if op.is_stat]
    assert sum(count_computes) == len(stat_ops)  # every stat op of a level in that level's compute
    assert all(op.fitted for op in stat_ops)


@pytest.mark.parametrize("name", ["categorify+normalize", "fill-median>>normalize", "three-levels+parallel"])
def test_parquet_read_once_per_level(name, tmp_path, monkeypatch, count_computes):
    make_graph, levels = LEVEL_GRAPHS[name]
    df = make_frame()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in.parquet", row_group_size=50)
    reads = collections.Counter()
    real = readers.read_parquet_piece

    def counting(piece, columns):  # Dataset.to_ddf looks up readers.read_parquet_piece when called
        reads[piece.row_groups] += 1
        return real(piece, columns)

    monkeypatch.setattr(readers, "read_parquet_piece", counting)
    ds = Dataset(tmp_path / "in.parquet", part_size=50)
    assert ds.npartitions == 8
    Workflow(make_graph()).fit(ds)
    assert len(count_computes) == levels
    assert dict(reads) == {(k,): levels for k in range(8)}


# ---- embedding sizes --------------------------------------------------------------------------
def nvt_dim(card: int) -> int:
    return int(min(512, max(16, round(1.6 * card**0.56))))


def test_get_embedding_sizes_covers_every_categorical_output():
    df = make_frame()
    wf = Workflow(every_op_graph()).fit(Dataset(df, part_size=64))
    sizes = get_embedding_sizes(wf)
    assert sorted(sizes) == sorted(CATEGORICAL_OUTPUTS)
    schema = wf.output_schema()
    assert sorted(schema.categorical) == sorted(CATEGORICAL_OUTPUTS)
    assert schema.label == ["y"]
    assert set(schema.continuous) == {"x", "x_filled", "q_mm"}
    expected_card = {
        "s": 2 + 3 + int((df["s"].value_counts() >= 3).sum()),
        "i": 2 + 3 + int((df["i"].value_counts() >= 3).sum()),
        "t_id": 3 + 2,
        "t_none": 3,
        "x_b": 3 + 2,
        "s_h": 21,
        "s_X_i": 30,
    }
    for col, card in expected_card.items():
        assert sizes[col] == (card, nvt_dim(card)), col
    qb = next(op for op in wf.ops if isinstance(op, QuantileBucketize))
    assert sizes["q_qb"][0] == len(qb.stats["q"]["boundaries"]) + 2
    # the categorical ids of a transformed frame stay below the declared cardinality
    out = wf.transform(Dataset(df)).compute()
    for col, (card, _) in sizes.items():
        assert 0 <= out[col].min() and out[col].max() < card, col


@pytest.mark.parametrize("card", [1, 2, 3, 5, 50, 100, 1000, 10_000, 100_000, 1_000_000, 10**8])
def test_embedding_dim_rule(card):
    assert embedding_dim(card) == nvt_dim(card)


def test_embedding_dim_rule_reaches_the_cap():
    wf = Workflow(["s"] >> HashBucket(10**7)).fit(Dataset(pd.DataFrame({"s": ["a"]})))
    assert get_embedding_sizes(wf) == {"s": (10**7 + 1, 512)}
    wf = Workflow(["s"] >> HashBucket(2000)).fit(Dataset(pd.DataFrame({"s": ["a"]})))
    assert get_embedding_sizes(wf) == {"s": (2001, round(1.6 * 2001**0.56))}


# ---- save / load ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted every-op workflow, its saved directory and the frames it transforms."""
    df = make_frame(400, seed=1)
    new = make_frame(200, seed=2)
    new["s"] = new["s"].where(new.index % 7 != 0, "never-seen")
    new["i"] = new["i"] + 100
    wf = Workflow(every_op_graph()).fit(Dataset(df, part_size=64))
    path = tmp_path_factory.mktemp("wf") / "workflow"
    wf.save(path)
    return wf, path, df, new


def test_save_load_transform_identical(saved):
    wf, path, df, new = saved
    files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())
    assert all(f == "workflow.json" or f.endswith(".parquet") for f in files), files  # never pickle
    assert sum("/categories/" in f for f in files) == 4  # one vocabulary per Categorify column
    assert all("/categories/" in f or "/tail/" in f for f in files if f.endswith(".parquet"))  # + tails (update)
    loaded = Workflow.load(path)
    assert loaded.fitted
    assert loaded.output_columns == wf.output_columns
    assert loaded.output_schema() == wf.output_schema()
    assert get_embedding_sizes(loaded) == get_embedding_sizes(wf)
    for frame in (df, new):
        a = wf.transform(Dataset(frame, part_size=70)).compute()
        b = loaded.transform(Dataset(frame, part_size=30)).compute()
        pd.testing.assert_frame_equal(a, b)
    # saving the loaded workflow again writes the same document
    loaded.save(path.parent / "again")
    assert json.loads((path / "workflow.json").read_text()) == json.loads(
        (path.parent / "again" / "workflow.json").read_text())


def test_save_is_atomic_and_respects_overwrite(saved, tmp_path):
    wf, path, _, _ = saved
    with pytest.raises(FileExistsError):
        wf.save(path, overwrite=False)
    wf.save(tmp_path / "w")
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary directory left behind


def copy_save(path: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def vocabulary_files(path: Path) -> list[Path]:
    return sorted(Path(path).rglob("*.parquet"))


def test_load_truncated_json(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    doc = (dst / "workflow.json").read_bytes()
    (dst / "workflow.json").write_bytes(doc[: len(doc) // 2])
    with pytest.raises(WorkflowError):
        Workflow.load(dst)


def test_load_missing_or_empty_json(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    (dst / "workflow.json").write_text("")
    with pytest.raises(WorkflowError):
        Workflow.load(dst)
    (dst / "workflow.json").unlink()
    with pytest.raises(WorkflowError):
        Workflow.load(dst)
    with pytest.raises(WorkflowError):
        Workflow.load(tmp_path / "nowhere")


def test_load_deleted_vocabulary(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    vocabulary_files(dst)[0].unlink()
    with pytest.raises(WorkflowError, match="parquet"):
        Workflow.load(dst)


def test_load_vocabulary_with_rows_removed(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    f = max(vocabulary_files(dst), key=lambda p: pq.read_metadata(p).num_rows)
    t = pq.read_table(f)
    assert t.num_rows > 1
    pq.write_table(t.slice(0, t.num_rows - 1), f)
    with pytest.raises(WorkflowError, match="rows"):
        Workflow.load(dst)


def test_load_truncated_vocabulary_file(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    f = vocabulary_files(dst)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkflowError):
        Workflow.load(dst)


def test_load_wrong_format(saved, tmp_path):
    dst = copy_save(saved[1], tmp_path)
    doc = json.loads((dst / "workflow.json").read_text())
    doc["format"] = "ctrflow.workflow/999"
    (dst / "workflow.json").write_text(json.dumps(doc))
    with pytest.raises(WorkflowError, match="format"):
        Workflow.load(dst)


@pytest.mark.parametrize("corruption", ["no-graph", "unknown-op"])
def test_load_structurally_corrupt_json(saved, tmp_path, corruption):
    dst = copy_save(saved[1], tmp_path)
    doc = json.loads((dst / "workflow.json").read_text())
    if corruption == "no-graph":
        del doc["graph"]
    else:
        next(n for n in doc["graph"]["nodes"] if n["op"])["op"]["class"] = "NoSuchOp"
    (dst / "workflow.json").write_text(json.dumps(doc))
    with pytest.raises(WorkflowError):
        Workflow.load(dst)


def test_saved_document_is_strict_json(tmp_path):
    df = pd.DataFrame({"x": [np.nan, np.nan], "z": [1.0, 2.0]})
    wf = Workflow(["x", "z"] >> NormalizeMinMax()).fit(Dataset(df))
    wf.save(tmp_path / "w")

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    json.loads((tmp_path / "w" / "workflow.json").read_text(), parse_constant=reject)


def test_load_version_mismatch_warns_and_still_works(saved, tmp_path):
    wf, path, df, _ = saved
    dst = copy_save(path, tmp_path)
    doc = json.loads((dst / "workflow.json").read_text())
    assert set(doc["versions"]) >= {"ctrflow", "pandas", "pyarrow", "numpy", "dask"}
    doc["versions"]["pandas"] = "0.0.1"
    (dst / "workflow.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="pandas"):
        loaded = Workflow.load(dst)
    pd.testing.assert_frame_equal(loaded.transform(Dataset(df)).compute(), wf.transform(Dataset(df)).compute())


def test_load_same_versions_does_not_warn(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Workflow.load(saved[1])
