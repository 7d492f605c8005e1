"""Input readers: byte-range splitting of CSV / Criteo files, parquet row-group pieces, Dataset sources."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrflow.etl.dataset import Dataset
from ctrflow.etl.readers import CRITEO_COLUMNS, DatasetError


def _criteo_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n):
        ints = ["" if rng.random() < 0.3 else str(rng.integers(-3, 10**6)) for _ in range(13)]
        ints[0] = str(r)  # I1 = row number, to check every row is read exactly once
        cats = ["" if rng.random() < 0.2 else f"{rng.integers(0, 2**32):08x}" for _ in range(26)]
        out.append("\t".join([str(r % 2), *ints, *cats]))
    return out


@pytest.mark.parametrize("part_size", ["1KB", "7KB", "1MB"])
def test_criteo_byte_ranges_read_every_row_once(tmp_path, part_size):
    lines = _criteo_lines(700)
    (tmp_path / "day_0").write_text("\n".join(lines) + "\n")
    ds = Dataset(tmp_path / "day_0", engine="criteo", part_size=part_size)
    df = ds.compute()
    assert list(df.columns) == CRITEO_COLUMNS
    assert sorted(df["I1"].astype(int).tolist()) == list(range(700))
    first = lines[5].split("\t")
    row = df[df["I1"] == 5].iloc[0]
    assert row["C1"] == (first[14] or None) or (pd.isna(row["C1"]) and first[14] == "")
    assert pd.isna(row["I2"]) == (first[2] == "")


def test_criteo_gz_equals_plain(tmp_path):
    lines = _criteo_lines(300, seed=3)
    (tmp_path / "plain").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "day.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    a = Dataset(tmp_path / "plain", engine="criteo", part_size="2KB").compute().reset_index(drop=True)
    b = Dataset(tmp_path / "day.gz", engine="criteo").compute().reset_index(drop=True)
    pd.testing.assert_frame_equal(a.astype(str), b.astype(str))


def test_csv_with_header_split(tmp_path):
    df = pd.DataFrame({"id": np.arange(1000), "x": np.linspace(0, 1, 1000), "s": [f"v{i % 7}" for i in range(1000)]})
    df.to_csv(tmp_path / "a.csv", index=False)
    got = Dataset(tmp_path / "a.csv", engine="csv", part_size="3KB").compute()
    assert sorted(got["id"].astype(int).tolist()) == list(range(1000))
    assert set(got["s"].astype(str)) == {f"v{i}" for i in range(7)}


def test_parquet_pieces_follow_row_groups(tmp_path):
    t = pa.table({"a": np.arange(10_000)})
    pq.write_table(t, tmp_path / "x.parquet", row_group_size=1000)
    ds = Dataset(tmp_path / "x.parquet", part_size=2500)
    assert ds.npartitions == 5  # 2 row groups each (2000 rows <= 2500)
    assert ds.num_rows == 10_000
    assert ds.compute()["a"].tolist() == list(range(10_000))


def test_sources_glob_list_dir_dataframe(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"a": [i]}), tmp_path / f"p{i}.parquet")
    assert Dataset(str(tmp_path / "p*.parquet")).num_rows == 3
    assert Dataset([tmp_path / "p0.parquet", tmp_path / "p2.parquet"]).compute()["a"].tolist() == [0, 2]
    assert Dataset(tmp_path).num_rows == 3
    assert Dataset(pd.DataFrame({"a": range(10)}), part_size=3).npartitions == 4


def test_bad_sources(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset(tmp_path / "missing.parquet")
    with pytest.raises(DatasetError, match="no file matches"):
        Dataset(str(tmp_path / "*.parquet"))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"b": [1]}), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match="share a schema"):
        Dataset(tmp_path)
    with pytest.raises(DatasetError, match="not in the input"):
        Dataset(tmp_path / "a.parquet", columns=["zzz"])
    with pytest.raises(ValueError, match="engine"):
        Dataset(tmp_path / "a.parquet", engine="orc")
