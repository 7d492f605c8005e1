"""``Dataset``: a lazily read, partitioned table (NVTabular's contract).

Example:
    >>> import pandas as pd
    >>> ds = Dataset(pd.DataFrame({"a": [1, 2, 3]}))
    >>> ds.to_ddf().compute()["a"].tolist()
    [1, 2, 3]
"""

from __future__ import annotations

import glob
import os
import sys
import uuid
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd

from ctrflow.etl import dispatch, readers
from ctrflow.etl.readers import DatasetError, Piece
from ctrflow.etl.schema import Schema

DEFAULT_PART_ROWS = 1_000_000
ENGINES = ("parquet", "csv", "criteo")
_SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz"), "criteo": (".gz", ".txt", ".tsv", "")}


def parse_part_size(part_size: int | str | None, default: int) -> int:
    """Rows (int) or bytes with a unit (``"256MB"``, ``"1GB"``) -> an int."""
    if part_size is None:
        return default
    if isinstance(part_size, int):
        if part_size <= 0:
            raise ValueError(f"part_size must be positive, got {part_size}")
        return part_size
    s = str(part_size).strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def expand_paths(source: str | os.PathLike | list, engine: str) -> list[str]:
    """Files named by paths, globs or directories (sorted); raises ``DatasetError`` if none."""
    items = source if isinstance(source, (list, tuple)) else [source]
    files: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.endswith(_SUFFIXES[engine]) and not f.startswith((".", "_"))
            )
            if not found:
                raise DatasetError(f"directory {item} holds no {engine} files")
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise DatasetError(f"no file matches {item}")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DatasetError(f"input {item} does not exist")
    return files


def _distributed_client() -> Any:
    """The default ``distributed.Client``, when one is running (without importing distributed)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


class _Partitions:
    """In-memory partitions served to ``dd.from_map`` by index (tokenized by identity, not content)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.token = uuid.uuid4().hex

    def __call__(self, i: int) -> Any:
        return self.parts[i]

    def __dask_tokenize__(self) -> str:
        return self.token


class Dataset:
    """A partitioned table read lazily with Dask.

    Args:
        source: a path, glob or directory (or a list of them), a pandas DataFrame, or a Dask
            DataFrame.
        engine: ``"parquet"`` | ``"csv"`` | ``"criteo"`` (Criteo Kaggle / 1TB day files: tab
            separated, no header, label, I1..I13, C1..C26; plain or ``.gz``).
        part_size: rows per partition (int) or bytes (``"256MB"``); parquet partitions are whole
            row groups, text partitions byte ranges (a ``.gz`` file is one partition).
        columns: read only these columns.
        schema: the processed-dataset schema, when the data is a ctrflow output.
    """

    def __init__(
        self,
        source: Any,
        engine: str = "parquet",
        part_size: int | str | None = None,
        columns: list[str] | None = None,
        schema: Schema | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
        self.columns = columns
        self.schema = schema
        self.files: list[str] = []
        self._ddf: dd.DataFrame | None = None
        self._pieces: list[Piece] = []
        if isinstance(source, dd.DataFrame):
            self._ddf = source
        elif isinstance(source, pd.DataFrame) or type(source).__module__.startswith("cudf"):
            rows = parse_part_size(part_size, DEFAULT_PART_ROWS)
            self._ddf = dd.from_pandas(source, npartitions=max(1, -(-len(source) // rows)), sort=False)
        else:
            self.files = expand_paths(source, engine)
            if self.schema is None and isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
                if os.path.exists(os.path.join(source, "schema.json")):
                    self.schema = Schema.load(source)
            self._plan(part_size)

    def _plan(self, part_size: int | str | None) -> None:
        if self.engine == "parquet":
            rows = parse_part_size(part_size, DEFAULT_PART_ROWS)
            self._pieces, arrow_schema = readers.parquet_pieces(self.files, rows)
            self._names = arrow_schema.names
            self._meta = readers.meta_from_schema(arrow_schema)
        else:
            nbytes = parse_part_size(part_size, 256 << 20)
            self._pieces = readers.text_pieces(self.files, nbytes)
            if not self._pieces:
                raise DatasetError(f"all input files are empty: {', '.join(self.files)}")
            if self.engine == "criteo":
                self._names, self._convert = readers.CRITEO_COLUMNS, readers.criteo_convert_options()
            else:
                self._names, self._convert = readers.csv_header_and_types(self.files[0])
            self._meta = readers.arrow_to_frame(readers.empty_table(self._names, self._convert))
        self.check_columns(self.columns or [])

    @property
    def column_names(self) -> list[str]:
        if self._ddf is not None:
            return list(self._ddf.columns)
        return list(self._names)

    def check_columns(self, names: list[str]) -> None:
        """Raise ``DatasetError`` naming the first requested column the input lacks."""
        have = self.column_names
        missing = [n for n in names if n not in have]
        if missing:
            raise DatasetError(f"column(s) {missing} not in the input (it has: {', '.join(have)})")

    @property
    def num_rows(self) -> int | None:
        """Row count from parquet footers, when known without reading the data."""
        if self.engine == "parquet" and self._pieces:
            return sum(p.rows for p in self._pieces)
        return None

    @property
    def npartitions(self) -> int:
        return self._ddf.npartitions if self._ddf is not None else len(self._pieces)

    def to_ddf(self, columns: list[str] | None = None) -> dd.DataFrame:
        """The Dask DataFrame (only ``columns`` read from disk when given)."""
        columns = columns or self.columns
        if self._ddf is not None:
            return self._ddf[columns] if columns else self._ddf
        meta = self._meta[columns] if columns else self._meta
        if self.engine == "parquet":
            return dd.from_map(readers.read_parquet_piece, self._pieces, columns=columns, meta=meta,
                               enforce_metadata=False, divisions=[None] * (len(self._pieces) + 1))
        return dd.from_map(
            readers.read_text_piece, self._pieces, fmt=self.engine, names=self._names, convert=self._convert,
            columns=columns, meta=meta, enforce_metadata=False, divisions=[None] * (len(self._pieces) + 1),
        )

    def estimated_bytes(self) -> int | None:
        """Uncompressed size of the selected parquet columns (from footers), when known."""
        if self.engine != "parquet" or not self._pieces:
            return None
        import pyarrow.parquet as pq

        total = 0
        for f in self.files:
            md = pq.ParquetFile(f).metadata
            for rg in range(md.num_row_groups):
                g = md.row_group(rg)
                total += sum(g.column(i).total_uncompressed_size for i in range(g.num_columns)
                             if self.columns is None or g.column(i).path_in_schema in self.columns)
        return total

    def persist(self, columns: list[str] | None = None) -> Dataset:
        """Read the data once into (worker) memory; later passes skip the disk and the decode.

        With a distributed client the partitions stay on the workers (``ddf.persist()``); with the
        local schedulers they are computed into this process and served by ``from_map``, which
        skips ``persist``'s tokenizing of the data itself (sha1 of every buffer: ~0.4 CPU-s per
        2M Criteo rows), and their string columns share one dictionary per column
        (``readers.share_dictionaries``: Categorify then counts and maps each value once).
        """
        ddf = self.to_ddf(columns)
        if _distributed_client() is not None:
            return Dataset(ddf.persist(), schema=self.schema)
        parts = readers.share_dictionaries(list(dispatch.compute(*ddf.to_delayed())))
        held = dd.from_map(_Partitions(parts), range(len(parts)), meta=ddf._meta, enforce_metadata=False,
                           divisions=[None] * (len(parts) + 1))
        return Dataset(held, schema=self.schema)

    def to_parquet(self, output_path: str | os.PathLike, overwrite: bool = False,
                   row_group_size: int | None = None, compression: str = "none") -> list[int]:
        """Write the dataset as ``output_path/part-NNNNN.parquet`` (+ ``schema.json`` when known).

        The directory appears only when complete (written to a temporary sibling, then renamed).

        Returns:
            Rows per written file.
        """
        from ctrflow.etl.writer import atomic_dir, write_parquet

        dtypes = {c.name: c.dtype for c in self.schema.columns if c.dtype != "unknown"} if self.schema else {}
        with atomic_dir(output_path, overwrite=overwrite) as tmp:
            [files] = write_parquet([(self.to_ddf(), tmp)], dtypes, row_group_size=row_group_size,
                                    compression=compression)
            if self.schema is not None:
                self.schema.metadata.setdefault("rows", sum(f["rows"] for f in files))
                self.schema.save(os.path.join(tmp, "schema.json"))
        return [f["rows"] for f in files]

    def compute(self) -> pd.DataFrame:
        """The whole table in memory (small data and tests only)."""
        return dask.compute(self.to_ddf())[0]

    def __repr__(self) -> str:
        src = f"{len(self.files)} {self.engine} file(s)" if self.files else "a DataFrame"
        return f"Dataset({src}, {self.npartitions} partition(s))"
