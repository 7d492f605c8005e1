"""The ETL's fast paths give the same results as the plain ones.

Covered: in-memory partitions sharing one dictionary per string column (``Dataset.persist`` ->
``readers.share_dictionaries``), Categorify's by-position count merge and per-dictionary id cache (and
its invalidation by ``Workflow.update``), fused elementwise chains (FillMissing -> Clip -> LogOp ->
Normalize on one array, never writing into the input), and ``dispatch.compute``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl import Dataset, Workflow, dispatch, readers
from ctrflow.etl.ops import Categorify, Clip, FillMissing, LogOp, Normalize, categorify
from ctrflow.etl.ops.categorify import array_key, merge_counts, partial_counts, resolve_counts


def _raw(tmp_path, n: int = 3000, files: int = 3, seed: int = 0) -> str:
    """Parquet files whose string columns are dictionary-encoded, one dictionary per file."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "raw"
    d.mkdir()
    for i in range(files):
        c = rng.zipf(1.5, n).astype(str).astype(object)
        c[rng.random(n) < 0.05] = None
        x = rng.integers(-5, 1000, n).astype(float)
        x[rng.random(n) < 0.1] = np.nan
        t = pa.table({"c": pa.array(c, pa.string()).dictionary_encode(),
                      "x": pa.array(x, pa.float64(), from_pandas=True).cast(pa.int64()), "y": rng.random(n)})
        pq.write_table(t, d / f"part-{i}.parquet")
    return str(d)


def _workflow() -> Workflow:
    return Workflow((["c"] >> Categorify(freq_threshold=2))
                    + (["x", "y"] >> FillMissing(0) >> Clip(min_value=0) >> LogOp() >> Normalize()))


def test_share_dictionaries_keeps_values_and_shares_one_dictionary(tmp_path):
    ds = Dataset(_raw(tmp_path), part_size=1)
    frames = [ds.to_ddf().get_partition(i).compute() for i in range(ds.npartitions)]
    shared = readers.share_dictionaries(frames)
    keys = {array_key(dispatch.to_arrow(f["c"]).dictionary) for f in shared}
    assert len(keys) == 1
    for a, b in zip(frames, shared, strict=True):
        assert a["c"].astype(object).tolist() == b["c"].astype(object).tolist()
        assert a["x"].equals(b["x"])


def test_persisted_fit_transform_equals_streamed(tmp_path):
    raw = _raw(tmp_path)
    streamed, held = _workflow(), _workflow()
    a = streamed.fit_transform(Dataset(raw, part_size=1)).compute()
    persisted = Dataset(raw, part_size=1).persist()
    b = held.fit(persisted).transform(persisted).compute()
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    ops = [(o.stats, {c: t.to_pydict() for c, t in o.vocabs.items()}) for o in held.ops if isinstance(o, Categorify)]
    ref = [(o.stats, {c: t.to_pydict() for c, t in o.vocabs.items()})
           for o in streamed.ops if isinstance(o, Categorify)]
    assert ops == ref
    [cat] = [o for o in held.ops if isinstance(o, Categorify)]
    assert sum(key[2][1] > 0 for key in cat._lut_cache) == 1  # one shared dictionary (+ the empty meta one)


def test_shared_dictionary_merge_equals_hashed_merge():
    rng = np.random.default_rng(1)
    values = pa.array(rng.integers(0, 50, 600).astype(str)).dictionary_encode()
    frames = [pd.DataFrame({"c": pd.Series(pd.arrays.ArrowExtensionArray(values.slice(i, n)))})
              for i, n in ((0, 200), (200, 397), (597, 3))]  # slices share the dictionary, see subsets of it
    dense = resolve_counts(merge_counts([{"c": partial_counts(f["c"])} for f in frames]))["c"]
    split = [pd.DataFrame({"c": f["c"].astype(object)}) for f in frames]  # own dictionary each
    hashed = resolve_counts(merge_counts([{"c": partial_counts(f["c"])} for f in split]))["c"]
    assert dense["rows"] == hashed["rows"] == 600 and dense["nulls"] == hashed["nulls"]
    assert dense["table"].sort_by("value").equals(hashed["table"].sort_by("value"))


@pytest.fixture(autouse=True)
def _cache_every_dictionary(monkeypatch):
    monkeypatch.setattr(categorify, "LUT_CACHE_MIN", 0)  # exercise the id cache on small data


def test_id_cache_follows_update(tmp_path):
    raw = _raw(tmp_path, files=2)
    held = Dataset(raw, part_size=1).persist()
    wf = Workflow(["c"] >> Categorify(freq_threshold=2))
    wf.fit(held)
    before = wf.transform(held).compute()["c"].to_numpy()
    new_day = pd.DataFrame({"c": ["brand-new"] * 5})
    wf.update(Dataset(new_day), force=True)
    after = wf.transform(held).compute()["c"].to_numpy()
    np.testing.assert_array_equal(before, after)  # ids of old values stay
    fresh = wf.transform(Dataset(pd.DataFrame({"c": ["brand-new"]}))).compute()["c"].tolist()
    assert fresh[0] > before.max()  # appended after the existing ids


@pytest.mark.parametrize("fill", [0, 2.5, -1, "median"])
def test_fused_chain_equals_op_by_op_and_leaves_input_alone(fill):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 10, 500)
    x[rng.random(500) < 0.2] = np.nan
    ints = rng.integers(-3, 9, 500)
    nulls = rng.random(500) < 0.1
    df = pd.DataFrame({"x": x, "i": pd.array(ints, dtype="Int64"),  # numpy-backed, masked ints
                       "a": pd.Series(pd.arrays.ArrowExtensionArray(pa.array(ints, mask=nulls)))})  # arrow ints
    df.loc[df.index[:7], "i"] = pd.NA
    cols = ["x", "i", "a"]
    keep = df.copy()
    wf = Workflow(cols >> FillMissing(fill) >> Clip(min_value=0) >> LogOp() >> Normalize())
    out = wf.fit_transform(Dataset(df)).compute()
    pd.testing.assert_frame_equal(df, keep)  # in-place ops never write into the input
    ops = [n.op for n in wf.output_node.walk() if n.op is not None]
    ref = df
    for op in ops:
        ref = op.transform(cols, ref)
    pd.testing.assert_frame_equal(out, ref)
    for c in cols:
        f = ops[0].stats[c]["median"] if fill == "median" else fill
        v = np.log1p(np.clip(np.nan_to_num(df[c].to_numpy(dtype=float, na_value=np.nan), nan=f), 0, None))
        np.testing.assert_allclose(out[c], (v - v.mean()) / v.std(ddof=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("configured", [None, "synchronous"])
def test_dispatch_compute(configured):
    import dask

    with dask.config.set(scheduler=configured):
        assert dispatch.compute(dask.delayed(sum)([1, 2]), 3) == (3, 3)


def test_lut_built_once_under_concurrency(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    op = Categorify()
    op.fit_finalize(resolve_counts({"c": partial_counts(pd.Series(["a", "b", "b", None, "c"]))}))
    uniques = pa.array(["b", "z", "a", "c"])
    calls = []
    ids_of = op._ids_of
    monkeypatch.setattr(op, "_ids_of", lambda col, u: calls.append(1) or ids_of(col, u))
    with ThreadPoolExecutor(8) as pool:
        luts = list(pool.map(lambda _: op._lut("c", uniques, "int32"), range(32)))
    assert len(calls) == 1
    for lut in luts:
        assert lut.tolist() == [3, 2, 4, 5, 1]  # b (2x) first, unseen z -> OOV, null -> 1


@pytest.mark.parametrize("series", [
    pd.Series([1.0, 2.0]), pd.Series([1.0, np.nan]), pd.Series([1.0, 2.0], dtype="Float64"),
    pd.Series([1, None], dtype="Int64"), pd.Series([1, 2]), pd.Series([1.0, 2.0], dtype="float32"),
    pd.Series(pd.arrays.ArrowExtensionArray(pa.array([1.0, 2.0]))),
    pd.Series(pd.arrays.ArrowExtensionArray(pa.array([1, None]))),
], ids=lambda s: str(s.dtype))
def test_float_work_never_aliases_its_input(series):
    before = series.copy()
    x = dispatch.float_work(series)
    x[:] = 99.0
    assert series.equals(before)


def test_writer_marks_columns_without_nulls_required(tmp_path):
    from ctrflow.etl.writer import write_partition

    df = pd.DataFrame({"c": np.arange(5, dtype=np.int64), "x": [1.0, np.nan, 3.0, 4.0, 5.0],
                       "y": np.linspace(0, 1, 5)})
    path = str(tmp_path / "p.parquet")
    assert write_partition(df, path, {"c": "int32", "x": "float32", "y": "float32"}, None) == 5
    schema = pq.read_schema(path)
    assert {f.name: f.nullable for f in schema} == {"c": False, "x": True, "y": False}
    assert schema.field("c").type == pa.int32()
    back = pq.read_table(path)
    assert back.column("c").to_pylist() == list(range(5))
    assert back.column("x").null_count == 1 and back.column("x").to_pylist()[2] == 3.0
    # without dtypes the pandas metadata survives (index and dtypes round-trip)
    write_partition(df, path, {}, None)
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)


@pytest.mark.parametrize("compression", ["none", "snappy"])
def test_plain_output_is_one_page_per_column_chunk(tmp_path, compression):
    """Plain output: one PLAIN page per column chunk, which the loader copies out of the file as it lies."""
    from ctrflow.etl.writer import write_partition
    from ctrflow.loader import pages

    n = 50_000  # > pyarrow's default of 20k rows per page
    df = pd.DataFrame({"c": np.arange(n, dtype=np.int32), "x": np.linspace(0, 1, n, dtype=np.float32)})
    path = str(tmp_path / "p.parquet")
    write_partition(df, path, {}, None, compression)
    layouts: dict = {}
    table = pages.read_row_groups(path, pq.read_metadata(path), [0], ["c", "x"], layouts)
    assert table.column("c").to_pylist() == list(range(n))
    if compression == "none":
        assert [len(counts) for _, counts in layouts.values()] == [1, 1]
    else:  # dictionary + snappy pages: decoded by pyarrow
        assert all(v is None for v in layouts.values())
