"""The embedded synthetic data set: schema, shape of the data, determinism, oracle, atomic output."""

from __future__ import annotations

import filecmp
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import synthetic
from ctrflow.etl.synthetic import model as synthetic_model

ROWS = 20_000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "raw"
    meta = synthetic.generate(str(out), rows=ROWS, seed=7, part_rows=7_000)
    return str(out), meta


def _read(out: str, split: str) -> pa.Table:
    files = sorted(os.listdir(os.path.join(out, split)))
    return pa.concat_tables([pq.read_table(os.path.join(out, split, f)) for f in files])


def test_layout_and_metadata(data):
    out, meta = data
    assert sorted(os.listdir(out)) == ["synthetic.json", "train", "valid"]
    assert meta["train_rows"] == 18_000 and meta["valid_rows"] == 2_000 and meta["rows"] == ROWS
    assert meta["files"]["train"] == [f"train/part-{i:05d}.parquet" for i in range(3)]  # 3 x 6,000 rows
    assert meta["files"]["valid"] == ["valid/part-00000.parquet"]
    for rel in meta["files"]["train"] + meta["files"]["valid"]:
        assert pq.ParquetFile(os.path.join(out, rel)).metadata.num_row_groups == 1
    with open(os.path.join(out, "synthetic.json")) as f:
        assert json.load(f) == meta
    assert meta["generator"] == synthetic.GENERATOR and meta["seed"] == 7
    assert meta["columns"]["categorical"] == [f"C{i}" for i in range(1, 27)]
    assert meta["columns"]["continuous"] == [f"I{i}" for i in range(1, 14)]
    assert set(meta["oracle"]) >= {"valid_auc", "valid_logloss", "train_auc"}


def test_schema_and_dtypes(data):
    out, _ = data
    for split in ("train", "valid"):
        t = _read(out, split)
        assert t.column_names == ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
        assert t.schema.field("label").type == pa.int8()
        for i in range(1, 14):
            assert t.schema.field(f"I{i}").type == pa.int64()
        for i in range(1, 27):
            assert t.schema.field(f"C{i}").type == pa.dictionary(pa.int32(), pa.string())
        assert set(np.unique(t["label"].to_numpy())) == {0, 1}


def test_values_look_like_criteo(data):
    out, meta = data
    t = _read(out, "train")
    hexes = t["C3"].combine_chunks().dictionary.to_pylist()
    assert all(re.fullmatch("[0-9a-f]{8}", h) for h in hexes)
    assert t["I1"].null_count > 0.3 * len(t) and t["I2"].null_count == 0
    assert t["C22"].null_count > 0.5 * len(t) and t["C1"].null_count == 0
    i2 = t["I2"].to_numpy()
    assert (i2 < 0).any() and i2.min() >= -3
    i5 = t["I5"].drop_null().to_numpy()
    assert i5.max() > 50 * np.median(i5)  # heavy tail
    assert 0.15 < meta["ctr"]["train"] < 0.35


def test_cardinalities(data):
    out, meta = data
    cards = meta["cardinalities"]
    assert min(cards.values()) <= 12 and max(cards.values()) >= 1_000_000
    t = _read(out, "train")
    assert len(pc_unique(t["C9"])) == meta["train_unique"]["C9"] == cards["C9"]  # small: all seen
    assert len(pc_unique(t["C3"])) == meta["train_unique"]["C3"]
    # power law: the most frequent C3 value covers far more rows than a uniform share
    counts = t["C3"].combine_chunks().value_counts().field("counts").to_numpy()
    assert counts.max() > 100 * len(t) / cards["C3"]


def pc_unique(col: pa.ChunkedArray) -> set:
    return set(col.combine_chunks().cast(pa.string()).drop_null().to_pylist())


def test_valid_has_unseen_categories(data):
    out, meta = data
    train, valid = _read(out, "train"), _read(out, "valid")
    for name in ("C3", "C10", "C24"):
        seen = pc_unique(train[name])
        v = valid[name].combine_chunks().cast(pa.string()).drop_null().to_pylist()
        share = np.mean([x not in seen for x in v])
        assert share > 0.02
        assert share == pytest.approx(meta["valid_unseen_share"][name])
    assert meta["valid_unseen_share"]["C9"] == 0.0


def test_oracle_matches_sklearn(data):
    sk = pytest.importorskip("sklearn.metrics")
    out, meta = data
    model = synthetic_model.ClickModel(7)
    rows = synthetic_model.draw_rows(model, ROWS, meta["train_rows"], [meta["train_rows"], meta["valid_rows"]])
    for split, part in zip(("train", "valid"), rows, strict=True):
        y = _read(out, split)["label"].to_numpy()
        np.testing.assert_array_equal(y, part["label"])  # files hold the labels drawn from these p
        assert meta["oracle"][f"{split}_auc"] == pytest.approx(sk.roc_auc_score(y, part["prob"]), abs=1e-12)
        assert meta["oracle"][f"{split}_logloss"] == pytest.approx(sk.log_loss(y, part["prob"]), abs=1e-9)
    assert 0.7 < meta["oracle"]["valid_auc"] < 0.85


def test_auc_handles_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5_000)
    s = rng.integers(0, 7, 5_000).astype(float)  # many ties
    assert synthetic.auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(synthetic.auc(np.zeros(4), np.arange(4.0)))


def test_deterministic_and_independent_of_part_rows(data, tmp_path):
    out, meta = data
    again = synthetic.generate(str(tmp_path / "a"), rows=ROWS, seed=7, part_rows=7_000)
    assert again == meta
    for rel in meta["files"]["train"] + meta["files"]["valid"]:
        assert filecmp.cmp(os.path.join(out, rel), tmp_path / "a" / rel, shallow=False)
    one = synthetic.generate(str(tmp_path / "b"), rows=ROWS, seed=7, part_rows=50_000)
    assert one["oracle"] == meta["oracle"]
    a, b = _read(out, "train"), _read(str(tmp_path / "b"), "train")
    for name in ("label", "I2"):
        assert a[name].equals(b[name])
    assert a["C3"].cast(pa.string()).equals(b["C3"].cast(pa.string()))
    other = synthetic.generate(str(tmp_path / "c"), rows=ROWS, seed=8)
    assert other["oracle"] != meta["oracle"]


def test_atomic_output(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    synthetic.generate(str(out), rows=2_000, seed=1)
    (out / "stale.txt").write_text("old")
    synthetic.generate(str(out), rows=2_000, seed=2)  # replaces the directory as a whole
    assert sorted(os.listdir(tmp_path)) == ["raw"]
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 2

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)  # the module generate() writes through
    with pytest.raises(OSError, match="disk full"):
        synthetic.generate(str(out), rows=2_000, seed=3)
    assert sorted(os.listdir(tmp_path)) == ["raw"]  # no temporary directory left behind
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 2  # old data intact


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="validation row"):
        synthetic.generate(str(tmp_path / "x"), rows=5, valid_fraction=0.0)
    with pytest.raises(ValueError, match="part_rows"):
        synthetic.generate(str(tmp_path / "x"), rows=100, part_rows=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(str(tmp_path / "x"), rows=100, seed=-1)
    assert not os.listdir(tmp_path)


def test_tiny_split_without_both_labels_stores_null(tmp_path):
    for seed in range(40):  # 2 validation rows: some seed draws two equal labels
        meta = synthetic.generate(str(tmp_path / "t"), rows=20, seed=seed)
        if meta["oracle"]["valid_auc"] is None:
            assert json.loads((tmp_path / "t" / "synthetic.json").read_text())["oracle"]["valid_auc"] is None
            return
    pytest.fail("no seed gave a one-class validation split")
