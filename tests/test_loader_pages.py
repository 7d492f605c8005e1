"""ctrflow.loader.pages: plain columns read as page views equal pyarrow's decode; the rest falls back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.loader import pages

ROWS = 2000


def _table(nullable: bool = False) -> pa.Table:
    rng = np.random.default_rng(0)
    t = pa.table({
        "i32": rng.integers(-(2**31), 2**31 - 1, ROWS, dtype=np.int32),
        "i64": rng.integers(-(2**62), 2**62, ROWS, dtype=np.int64),
        "f32": rng.standard_normal(ROWS).astype(np.float32),
        "f64": rng.standard_normal(ROWS),
    })
    return t.cast(pa.schema([f.with_nullable(nullable) for f in t.schema]))


def _read(path: str, rgs: list[int], names: list[str]) -> tuple[pa.Table, dict]:
    layouts: dict = {}
    return pages.read_row_groups(path, pq.read_metadata(path), rgs, names, layouts), layouts


def _check(path: str, rgs: list[int], names: list[str]) -> dict:
    got, layouts = _read(path, rgs, names)
    want = pq.ParquetFile(path).read_row_groups(rgs, columns=names)
    assert got.column_names == names
    for n in names:
        assert got.column(n).type == want.column(n).type
        assert got.column(n).to_pylist() == want.column(n).to_pylist(), n
    return layouts


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("checksum", [True, False])
def test_plain_pages_equal_pyarrow_and_are_views(tmp_path, version, stats, checksum):
    path = str(tmp_path / "p.parquet")
    pq.write_table(_table(), path, row_group_size=700, compression="none", use_dictionary=False,
                   max_rows_per_page=97, data_page_version=version, write_statistics=stats,
                   write_page_checksum=checksum)
    names = ["f64", "i32", "i64", "f32"]
    layouts = _check(path, [0, 1, 2], names)
    assert len(layouts) == 4 * 3 and all(v is not None for v in layouts.values())
    offsets, counts = layouts[(path, 1, 0)]
    assert counts.sum() == 700 and len(counts) == 8  # ceil(700 / 97) pages
    got, _ = _read(path, [2, 1], ["i32"])  # row groups in any order, as asked
    want = pq.ParquetFile(path).read_row_groups([2, 1], columns=["i32"])
    assert got.column("i32").to_pylist() == want.column("i32").to_pylist()
    assert got.column("i32").num_chunks == 8 + 7  # one zero-copy view per page


@pytest.mark.parametrize("case", ["nullable", "snappy", "dictionary", "byte_stream_split", "int8", "list"])
def test_other_layouts_fall_back_to_pyarrow(tmp_path, case):
    path = str(tmp_path / "p.parquet")
    t = _table(nullable=case == "nullable")
    kw = dict(compression="none", use_dictionary=False)
    if case == "snappy":
        kw["compression"] = "snappy"
    elif case == "dictionary":
        kw["use_dictionary"] = True
    elif case == "byte_stream_split":
        kw["use_byte_stream_split"] = ["f32", "f64"]
    elif case == "int8":
        t = t.append_column(pa.field("small", pa.int8(), nullable=False), [pa.array(np.arange(ROWS) % 100, pa.int8())])
    elif case == "list":
        lists = pa.array([[i, i + 1] for i in range(ROWS)], pa.list_(pa.int32()))
        t = t.append_column(pa.field("lst", lists.type, nullable=False), [lists])
    pq.write_table(t, path, row_group_size=900, **kw)
    names = t.column_names
    layouts = _check(path, [0, 2], names)
    plain = {k[2] for k, v in layouts.items() if v is not None}
    index = {n: i for i, n in enumerate(names)}
    if case in ("nullable", "snappy", "dictionary"):
        assert plain == set()
    elif case == "byte_stream_split":  # the ints stay plain, the split floats are decoded by pyarrow
        assert plain == {index["i32"], index["i64"]}
        assert layouts[(path, 0, index["f32"])] is None
    else:
        assert plain == {index[n] for n in ("i32", "i64", "f32", "f64")}


def test_views_outlive_the_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(_table(), path, compression="none", use_dictionary=False)
    want = pq.read_table(path).column("i64").to_pylist()
    got, layouts = _read(str(path), [0], ["i64"])
    assert layouts[(str(path), 0, 1)] is not None
    path.unlink()  # the mapping keeps the pages
    assert got.column("i64").to_pylist() == want


def test_disabled_reads_everything_with_pyarrow(tmp_path, monkeypatch):
    path = str(tmp_path / "p.parquet")
    pq.write_table(_table(), path, compression="none", use_dictionary=False)
    monkeypatch.setattr(pages, "ENABLED", False)
    layouts = _check(path, [0], ["i32", "f32"])
    assert layouts == {}


def test_loader_reads_etl_output_through_page_views(tmp_path):
    """What the ETL writer produces is what the fast path takes (REQUIRED, plain, uncompressed)."""
    import pandas as pd

    pytest.importorskip("dask")  # the ETL writer (a GPU box may have no Dask)
    from ctrflow.etl.writer import write_partition
    from ctrflow.loader import Loader

    rid = np.arange(3000)
    df = pd.DataFrame({"rid": rid, "c": rid % 7, "x": rid * 0.25, "y": (rid % 2).astype(float)})
    write_partition(df, str(tmp_path / "part-00000.parquet"), {"rid": "int32", "c": "int32", "x": "float32",
                                                               "y": "float32"}, None)
    lo = Loader(str(tmp_path), 256, shuffle=True, cats=["rid", "c"], conts=["x"], labels=["y"])
    seen = []
    for b in lo:
        r = b.categorical[:, 0].long()
        assert (b.categorical[:, 1].long() == r % 7).all() and (b.continuous[:, 0] == r * 0.25).all()
        assert (b.label == (r % 2).float()).all()
        seen.append(r.numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), rid)
    assert lo.source.page_layouts and all(v is not None for v in lo.source.page_layouts.values())


def test_a_footer_pointing_past_the_file_raises_instead_of_crashing(tmp_path):
    """Stale metadata (a file replaced by a shorter one): never map past the end (SIGBUS), let pyarrow raise."""
    big, small = str(tmp_path / "big.parquet"), str(tmp_path / "small.parquet")
    pq.write_table(_table(), big, compression="none", use_dictionary=False)
    pq.write_table(_table().slice(0, 10), small, compression="none", use_dictionary=False)
    with pytest.raises(Exception) as e:  # noqa: B017 - pyarrow's own error for a mismatched footer
        pages.read_row_groups(small, pq.read_metadata(big), [0], ["i64"], {})
    assert "mmap" not in str(e.value)  # the file's problem, not a mapping detail
