"""Incremental days: ``Workflow.update`` and ``etl/run.py --update`` (small data, seconds)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import Dataset, Workflow
from ctrflow.etl.ops import Categorify, FillMissing, Normalize, NormalizeMinMax, QuantileBucketize, Rename
from ctrflow.etl.run import main as etl_main
from ctrflow.etl.schema import Schema
from ctrflow.etl.update import AlreadySeenError


def day(seed: int, n: int = 4000, offset: int = 0) -> pd.DataFrame:
    """One day: a float with NaNs and a Zipf categorical whose values shift by ``offset``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0 + seed, 3.0, n)
    x[rng.random(n) < 0.1] = np.nan
    c = (rng.zipf(1.5, n) + offset).astype(str).astype(object)
    c[rng.random(n) < 0.05] = None
    return pd.DataFrame({"x": x, "c": c, "label": rng.integers(0, 2, n).astype(np.int8)})


def graph():
    return ((["x"] >> Normalize())
            + (["x"] >> NormalizeMinMax() >> Rename(postfix="_mm"))
            + (["x"] >> FillMissing("median") >> Rename(postfix="_f"))
            + (["x"] >> QuantileBucketize(5) >> Rename(postfix="_q"))
            + (["c"] >> Categorify(freq_threshold=3)))


def op_of(wf: Workflow, cls: type):
    return next(o for o in wf.ops if type(o) is cls)


def ids(wf: Workflow, df: pd.DataFrame) -> np.ndarray:
    return wf.transform(Dataset(df)).compute()["c"].to_numpy()


def test_update_equals_fit_on_all_days():
    d1, d2, d3 = day(1), day(2, offset=3), day(3, n=2500, offset=7)
    full = Workflow(graph()).fit(Dataset(pd.concat([d1, d2, d3], ignore_index=True), part_size=1500))
    inc = Workflow(graph()).fit(Dataset(d1, part_size=1500))
    inc.update(Dataset(d2, part_size=1300)).update(Dataset(d3, part_size=1000))
    for cls in (Normalize, NormalizeMinMax):
        a, b = op_of(full, cls).stats["x"], op_of(inc, cls).stats["x"]
        assert a["count"] == b["count"] and a["min"] == b["min"] and a["max"] == b["max"]
        for k in ("mean", "m2") + (("std",) if cls is Normalize else ()):
            assert b[k] == pytest.approx(a[k], rel=1e-12)
    med_full, med_inc = op_of(full, FillMissing).stats["x"]["median"], op_of(inc, FillMissing).stats["x"]["median"]
    assert abs(med_full - med_inc) < 0.02 * op_of(full, Normalize).stats["x"]["std"]  # sketch rank error
    # categories: same kept set as a fit on everything, counts accumulated exactly
    cf, ci = op_of(full, Categorify), op_of(inc, Categorify)
    assert ci.cardinality("c") == cf.cardinality("c")
    vf = dict(zip(*cf.vocabs["c"].to_pydict().values(), strict=True))
    vi = dict(zip(*ci.vocabs["c"].to_pydict().values(), strict=True))
    assert vf == vi
    assert {k: ci.stats["c"][k] for k in ("rows", "nulls", "distinct", "oov_rows")} == \
        {k: cf.stats["c"][k] for k in ("rows", "nulls", "distinct", "oov_rows")}


def test_ids_stable_new_values_appended_dims_pinned():
    d1, d2 = day(1), day(2, offset=40)
    wf = Workflow(graph()).fit(Dataset(d1))
    before, card1 = ids(wf, d1), wf.output_schema()["c"].cardinality
    dim1 = wf.output_schema()["c"].embedding_dim
    bounds = list(op_of(wf, QuantileBucketize).stats["x"]["boundaries"])
    wf.update(Dataset(d2))
    after = ids(wf, d1)
    kept = before >= 3
    assert (after[kept] == before[kept]).all()  # every day-1 id is unchanged
    assert (after[before == 1] == 1).all()
    schema = wf.output_schema()["c"]
    assert schema.cardinality > card1 and schema.embedding_dim == dim1
    op = op_of(wf, Categorify)
    vocab = op.vocabs["c"].to_pydict()
    new_vals, new_counts = vocab["value"][card1 - 3:], vocab["count"][card1 - 3:]
    assert new_vals and all(v not in set(vocab["value"][: card1 - 3]) for v in new_vals)
    assert list(zip(new_counts, new_vals, strict=True)) == sorted(zip(new_counts, new_vals, strict=True),
                                                                  key=lambda t: (-t[0], t[1]))
    new_ids = ids(wf, d2)
    assert new_ids.max() == schema.cardinality - 1 and (new_ids[new_ids >= card1] >= card1).all()
    assert op_of(wf, QuantileBucketize).stats["x"]["boundaries"] == bounds  # bucket ids keep their meaning


def test_same_input_refused_unless_forced(tmp_path):
    for i, off in ((1, 0), (2, 5)):
        day(i, offset=off).to_parquet(tmp_path / f"day{i}.parquet")
    shutil.copy(tmp_path / "day1.parquet", tmp_path / "copy_of_day1.parquet")
    wf = Workflow(graph()).fit(Dataset(str(tmp_path / "day1.parquet")))
    for name in ("day1.parquet", "copy_of_day1.parquet"):
        with pytest.raises(AlreadySeenError, match="already ingested by the first fit"):
            wf.update(Dataset(str(tmp_path / name)))
    wf.update(Dataset(str(tmp_path / "day2.parquet")))
    wf.save(tmp_path / "wf")
    loaded = Workflow.load(tmp_path / "wf")
    assert len(loaded.seen) == 2
    with pytest.raises(AlreadySeenError, match="update 1"):
        loaded.update(Dataset(str(tmp_path / "day2.parquet")))
    loaded.update(Dataset(str(tmp_path / "day2.parquet")), force=True)
    assert loaded.seen[-1]["forced"] and op_of(loaded, Categorify).stats["c"]["updates"] == 2


def test_decay_retires_stale_category_without_moving_others(tmp_path):
    def frame(a: int, b: int, c: int) -> pd.DataFrame:
        return pd.DataFrame({"c": ["a"] * a + ["b"] * b + ["c"] * c})

    wf = Workflow(["c"] >> Categorify(freq_threshold=2)).fit(Dataset(frame(10, 3, 1)))
    probe = frame(1, 1, 1)
    assert ids(wf, probe).tolist() == [3, 4, 2]
    wf.update(Dataset(frame(10, 0, 1)), decay=0.5)  # b: 1.5 < 2 -> retired; c: 0.5 + 1 < 2
    assert ids(wf, probe).tolist() == [3, 2, 2]
    assert wf.output_schema()["c"].cardinality == 5  # the table keeps b's row: ids never shrink
    wf.update(Dataset(frame(10, 0, 4)), decay=0.5)  # c: 0.75 + 4 -> new id 5, not b's 4
    assert ids(wf, probe).tolist() == [3, 2, 5]
    wf.save(tmp_path / "wf")
    wf = Workflow.load(tmp_path / "wf")
    assert ids(wf, probe).tolist() == [3, 2, 5]
    wf.update(Dataset(frame(10, 5, 0)))  # b comes back above the threshold: its old id again
    assert ids(wf, probe).tolist() == [3, 4, 5]
    stats = op_of(wf, Categorify).stats["c"]
    assert stats["retired"] == 0 and stats["kept"] == 3


def test_max_size_and_saved_tail(tmp_path):
    d1, d2 = day(1), day(2, offset=2)
    wf = Workflow(["c"] >> Categorify(freq_threshold=2, max_size=40)).fit(Dataset(d1))
    wf.save(tmp_path / "wf")
    wf = Workflow.load(tmp_path / "wf")
    assert op_of(wf, Categorify).tails["c"].num_rows > 0  # values cut by max_size / the threshold
    before = ids(wf, d1)
    wf.update(Dataset(d2))
    assert wf.output_schema()["c"].cardinality == 40 and (ids(wf, d1) == before).all()


def test_joint_vocabulary_update():
    try:
        op = Categorify(encode_type="joint")
    except TypeError:
        pytest.skip("Categorify has no joint encoding in this tree")
    d1 = pd.DataFrame({"a": ["x", "y", "x"], "b": ["y", "z", "z"]})
    d2 = pd.DataFrame({"a": ["w", "x", "v"], "b": ["w", "y", "u"]})
    wf = Workflow(["a", "b"] >> op).fit(Dataset(d1))
    out1 = wf.transform(Dataset(d1)).compute()
    wf.update(Dataset(d2))
    out2 = wf.transform(Dataset(pd.concat([d1, d2], ignore_index=True))).compute()
    assert (out2.iloc[:3].to_numpy() == out1.to_numpy()).all()
    assert out2.loc[3, "a"] == out2.loc[3, "b"] == 6  # "w" new, same id in both columns
    assert wf.output_schema()["a"].cardinality == wf.output_schema()["b"].cardinality == 9


# ---- CLI -----------------------------------------------------------------------------------------
def _cli_day(path, seed: int, offset: int, n: int = 3000) -> str:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "label": rng.integers(0, 2, n).astype(np.int8),
        "I1": rng.exponential(5, n),
        "C1": (rng.zipf(1.4, n) + offset).astype(str),
    })
    pq.write_table(__import__("pyarrow").Table.from_pandas(df, preserve_index=False), path)
    return str(path)


def test_cli_update(tmp_path, capsys):
    d1, d2 = _cli_day(tmp_path / "d1.parquet", 1, 0), _cli_day(tmp_path / "d2.parquet", 2, 30)
    valid = _cli_day(tmp_path / "v.parquet", 3, 10, n=1000)
    base = ["--cats", "C1", "--conts", "I1", "--no-progress"]
    assert etl_main(["--input", d1, "--valid", valid, "--output", str(tmp_path / "p1"), *base]) == 0
    p2 = str(tmp_path / "p2")
    assert etl_main(["--update", str(tmp_path / "p1"), "--input", d2, "--valid", valid, "--output", p2,
                     "--no-progress"]) == 0
    s1, s2 = Schema.load(tmp_path / "p1"), Schema.load(p2)
    assert s2["C1"].cardinality > s1["C1"].cardinality and s2["C1"].embedding_dim == s1["C1"].embedding_dim
    assert s2.metadata["update"]["day"] == 2 and s2.metadata["rows"]["valid"] == 1000
    assert sorted(os.listdir(p2)) == ["schema.json", "train", "valid", "workflow"]
    with open(os.path.join(p2, "workflow", "workflow.json")) as f:
        assert len(json.load(f)["seen"]) == 2
    # day-1 ids of the validation rows are unchanged where they were kept
    v1 = pd.read_parquet(tmp_path / "p1" / "valid")["C1"].to_numpy()
    v2 = pd.read_parquet(os.path.join(p2, "valid"))["C1"].to_numpy()
    assert (v2[v1 >= 3] == v1[v1 >= 3]).all() and (v2 >= 3).sum() >= (v1 >= 3).sum()
    capsys.readouterr()
    again = ["--update", os.path.join(p2, "workflow"), "--input", d2, "--valid", valid, "--output",
             str(tmp_path / "p3"), "--no-progress"]
    assert etl_main(again) == 2
    err = capsys.readouterr().err
    assert "already ingested by update 1" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "p3")
    assert etl_main([*again, "--force", "--decay", "0.5"]) == 0  # counts 2 -> 1: rare day-1 values retire
    v3 = pd.read_parquet(tmp_path / "p3" / "valid")["C1"].to_numpy()
    assert ((v3 == v2) | (v3 == 2)).all() and (v3 == 2).sum() > (v2 == 2).sum()
    assert etl_main(["--input", d1, "--decay", "0.9", "--output", str(tmp_path / "p4")]) == 2


def test_op_without_update_refused_before_any_change():
    from ctrflow.etl.ops import Operator

    class CountRows(Operator):  # a stat op with no update_finalize
        def fit(self, columns, ddf):
            from ctrflow.etl.stats import tree_reduce

            return tree_reduce(ddf[columns], len, sum)

        def fit_finalize(self, computed):
            self.stats = {"n": int(computed)}

        def transform(self, columns, df):
            return df[columns]

    wf = Workflow((["x"] >> Normalize()) + (["c"] >> CountRows())).fit(Dataset(day(1)))
    before = dict(op_of(wf, Normalize).stats["x"])
    with pytest.raises(ValueError, match="CountRows cannot be updated"):
        wf.update(Dataset(day(2)))
    assert op_of(wf, Normalize).stats["x"] == before


def test_cli_update_on_a_two_worker_cluster_equals_single_process(tmp_path, capsys):
    """``--update DIR --input DAY --workers 2`` (a local Dask cluster) writes what the same update
    without ``--workers`` writes: the same rows and ids, the same stats, vocabularies and tails."""
    pytest.importorskip("distributed")
    d1 = _cli_day(tmp_path / "d1.parquet", 1, 0, n=4000)
    (tmp_path / "day2").mkdir()  # the new day: two files of five 500-row groups, one partition each
    for name, seed, offset in (("a", 2, 30), ("b", 3, 60)):
        path = _cli_day(tmp_path / "day2" / f"{name}.parquet", seed, offset, n=2500)
        pq.write_table(pq.read_table(path), path, row_group_size=500)
    assert etl_main(["--input", d1, "--output", str(tmp_path / "p1"), "--cats", "C1", "--conts", "I1",
                     "--freq-threshold", "2", "--no-progress"]) == 0
    update = ["--update", str(tmp_path / "p1"), "--input", str(tmp_path / "day2"), "--part-size", "600",
              "--decay", "0.9", "--no-progress"]
    single, cluster = tmp_path / "single", tmp_path / "cluster"
    assert etl_main([*update, "--output", str(single)]) == 0
    assert etl_main([*update, "--output", str(cluster), "--workers", "2"]) == 0
    assert "2 worker(s)" in capsys.readouterr().err  # the second update did run on the cluster

    for split in ("train", "valid"):  # the random split and the ids: same rows in the same files
        files = sorted(os.listdir(single / split))
        assert files and files == sorted(os.listdir(cluster / split))
        for name in files:
            assert pq.read_table(single / split / name).equals(pq.read_table(cluster / split / name)), name
    sa, sb = Schema.load(single), Schema.load(cluster)
    assert sa["C1"].cardinality == sb["C1"].cardinality > Schema.load(tmp_path / "p1")["C1"].cardinality
    assert [c.to_dict() for c in sa.columns] == [c.to_dict() for c in sb.columns]
    assert sa.metadata["rows"] == sb.metadata["rows"]
    assert sa.metadata["update"]["grown"] == sb.metadata["update"]["grown"]
    wa, wb = (json.loads((d / "workflow" / "workflow.json").read_text()) for d in (single, cluster))
    assert wa["fitted"] == wb["fitted"]  # counts, moments, sketches, appended / retired values
    assert [len(r["files"]) for r in wb["seen"]] == [1, 2] and wb["seen"][-1]["decay"] == 0.9
    saved = sorted(str(p.relative_to(single)) for p in (single / "workflow").rglob("*.parquet"))
    assert saved == sorted(str(p.relative_to(cluster)) for p in (cluster / "workflow").rglob("*.parquet"))
    assert any("/categories/" in p for p in saved) and any("/tail/" in p for p in saved)
    for rel in saved:  # vocabularies in id order (the same ids), counts of the values below the threshold
        assert pq.read_table(single / rel).equals(pq.read_table(cluster / rel)), rel
