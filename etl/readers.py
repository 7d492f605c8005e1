"""Partition readers: parquet row groups, byte ranges of CSV / Criteo TSV files.

Each reader turns one *piece* (a file plus row groups or a byte range) into a pandas DataFrame
backed by pyarrow (``pd.ArrowDtype``) with stable types, so every partition of a dataset has the
same dtypes as its meta: strings as ``dictionary<int32, string>`` (Categorify and hashing work on
the dictionary and its indices, never on one Python object per row), integers as int64, floats as
float64. Wrapping arrow arrays costs nothing; converting them to numpy-backed pandas (categories,
masked ints) cost ten times the parquet decode on Criteo-shaped data.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctrflow.etl import dispatch, lists

log = logging.getLogger("ctrflow.etl")

CRITEO_CONTS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATS = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_CONTS, *CRITEO_CATS]


class DatasetError(ValueError):
    """Input that cannot be read: missing, empty, corrupt, or without a named column."""


@dataclass(frozen=True)
class Piece:
    """One partition's worth of input: a parquet file's row groups or a text file's byte range."""

    path: str
    row_groups: tuple[int, ...] = ()
    start: int = 0
    end: int = -1
    rows: int = -1


# ---- dtype normalisation -------------------------------------------------------------------
def _inf_to_null(name: str, col: pa.ChunkedArray) -> pa.ChunkedArray:
    """±inf as a missing value (null), like an empty field: one ``inf`` would otherwise turn a column's
    mean and variance, and so every normalised value of it, into inf / NaN. Says how many, once per column."""
    if col.null_count == len(col) or not pc.any(pc.is_inf(col)).as_py():
        return col
    n = pc.sum(pc.is_inf(col)).as_py()
    if name not in _INF_SEEN:
        _INF_SEEN.add(name)
        log.warning("column %s: %d infinite value(s) in this partition are treated as missing (null); "
                    "FillMissing fills them like any missing value", name, n)
    return pc.if_else(pc.is_inf(col), pa.scalar(None, pa.float64()), col)


_INF_SEEN: set[str] = set()


def normalize_arrow(table: pa.Table) -> pa.Table:
    """Strings to dictionary, other numerics to int64 / float64 (±inf as null), lists to ``list<string |
    int64 | float64>`` (``lists.normal_list_type``), one chunk per column."""
    cols, fields = [], []
    for name, col in zip(table.column_names, table.columns, strict=True):
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.dictionary_encode()
        elif pa.types.is_dictionary(t) and not pa.types.is_string(t.value_type):
            col = col.cast(t.value_type)
        elif pa.types.is_integer(t) and t != pa.int64():
            col = col.cast(pa.int64())
        elif pa.types.is_floating(t):
            col = _inf_to_null(name, col.cast(pa.float64()) if t != pa.float64() else col)
        elif pa.types.is_null(t) or pa.types.is_boolean(t):
            col = col.cast(pa.float64())
        elif lists.is_list_type(t):
            col = col.cast(lists.normal_list_type(t))
        cols.append(col)
        fields.append(pa.field(name, col.type))
    table = pa.Table.from_arrays(cols, schema=pa.schema(fields))
    if any(c.num_chunks > 1 for c in table.columns):
        table = table.unify_dictionaries().combine_chunks()
    return table


def arrow_to_frame(table: pa.Table) -> Any:
    """Arrow table to the current backend's frame with the shared dtypes (see module doc).

    pandas: arrow-backed columns (zero copy); cudf (Dask's ``dataframe.backend`` = cudf): a device
    frame built by the dispatch module.
    """
    table = normalize_arrow(table)
    if dispatch.current_backend_name() == "gpu":
        return dispatch.frame_from_arrow(table)
    return table.to_pandas(types_mapper=pd.ArrowDtype, split_blocks=True)


def share_dictionaries(frames: list[Any]) -> list[Any]:
    """In-memory partitions with one shared dictionary per string column.

    Each parquet row group brings its own dictionary; unifying them once (one hash pass over the
    dictionaries, indices remapped) lets Categorify count by adding arrays and map a column's values
    to ids once instead of once per partition. Values and row order are unchanged.

    Args:
        frames: pandas partitions with arrow-backed columns (others are returned as they are).

    Returns:
        The partitions, dictionary columns replaced by their unified equivalents.
    """
    if len(frames) < 2 or not all(isinstance(f, pd.DataFrame) for f in frames):
        return frames
    dtypes = frames[0].dtypes
    cols = [c for c, t in dtypes.items() if isinstance(t, pd.ArrowDtype) and pa.types.is_dictionary(t.pyarrow_dtype)
            and all(c in f.columns and f[c].dtype == t for f in frames)]
    if not cols:
        return frames

    def unify(c: str) -> pa.ChunkedArray:
        chunks = pa.chunked_array([dispatch.to_arrow(f[c]) for f in frames], type=dtypes[c].pyarrow_dtype)
        return pa.Table.from_arrays([chunks], names=[c]).unify_dictionaries().column(0)

    unified = dict(zip(cols, dispatch.thread_map(unify, cols), strict=True))  # the kernel releases the GIL
    out = []
    for i, f in enumerate(frames):
        new = {c: pd.Series(pd.arrays.ArrowExtensionArray(unified[c].chunk(i)), index=f.index, name=c, copy=False)
               for c in cols}
        out.append(pd.DataFrame({c: new.get(c, f[c]) for c in f.columns}, index=f.index, copy=False))
    return out


def meta_from_schema(schema: pa.Schema) -> Any:
    return arrow_to_frame(schema.empty_table())


# ---- parquet --------------------------------------------------------------------------------
def parquet_pieces(files: list[str], part_rows: int) -> tuple[list[Piece], pa.Schema]:
    """Group each file's row groups into pieces of about ``part_rows`` rows; check every footer."""
    dispatch.use_etl_memory_pool()
    pieces: list[Piece] = []
    schema: pa.Schema | None = None
    for f in files:
        try:
            md = pq.ParquetFile(f)
        except Exception as e:
            raise DatasetError(f"cannot read parquet file {f}: {e}") from None
        file_schema = md.schema_arrow
        if schema is None:
            schema = file_schema
        else:
            missing = [n for n in schema.names if n not in file_schema.names]
            if missing:
                raise DatasetError(f"{f} lacks columns {missing} that {files[0]} has: inputs must share a schema")
        group: list[int] = []
        rows = 0
        for rg in range(md.num_row_groups):
            n = md.metadata.row_group(rg).num_rows
            if group and rows + n > part_rows:
                pieces.append(Piece(f, tuple(group), rows=rows))
                group, rows = [], 0
            group.append(rg)
            rows += n
        if group:
            pieces.append(Piece(f, tuple(group), rows=rows))
    assert schema is not None
    return pieces, schema


def read_parquet_piece(piece: Piece, columns: list[str] | None) -> pd.DataFrame:
    dispatch.use_etl_memory_pool()
    try:
        pf = pq.ParquetFile(piece.path)
        table = pf.read_row_groups(list(piece.row_groups), columns=columns, use_threads=True)
    except Exception as e:
        raise DatasetError(f"cannot read {piece.path} (row groups {list(piece.row_groups)}): {e}") from None
    return arrow_to_frame(table)


# ---- CSV and Criteo TSV -----------------------------------------------------------------------
def _is_gz(path: str) -> bool:
    return path.endswith(".gz")


def text_pieces(files: list[str], part_bytes: int) -> list[Piece]:
    """Byte ranges of ``part_bytes`` per plain file; a ``.gz`` file is one piece (not splittable)."""
    pieces = []
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        if _is_gz(f):
            pieces.append(Piece(f, start=0, end=-1))
            continue
        for start in range(0, size, part_bytes):
            pieces.append(Piece(f, start=start, end=min(start + part_bytes, size)))
    return pieces


def _read_range(piece: Piece, skip_header: bool) -> bytes:
    """Bytes of the lines that *start* inside [start, end) (a line belongs to one piece)."""
    if piece.end < 0:
        opener = gzip.open if _is_gz(piece.path) else open
        with opener(piece.path, "rb") as fh:
            data = fh.read()
        if skip_header:
            data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
        return data
    with open(piece.path, "rb") as fh:
        if piece.start > 0:
            fh.seek(piece.start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # finish the line that began in the previous piece
        elif skip_header:
            fh.readline()
        begin = fh.tell()
        if begin >= piece.end:
            return b""
        data = fh.read(piece.end - begin)
        if not data.endswith(b"\n"):
            data += fh.readline()
    return data


def criteo_convert_options() -> pacsv.ConvertOptions:
    types = {"label": pa.int64(), **{c: pa.int64() for c in CRITEO_CONTS}}
    types.update({c: pa.dictionary(pa.int32(), pa.string()) for c in CRITEO_CATS})
    return pacsv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=[""])


def read_text_piece(
    piece: Piece,
    fmt: str,
    names: list[str],
    convert: pacsv.ConvertOptions,
    columns: list[str] | None,
) -> pd.DataFrame:
    """Parse one piece of a CSV (with header) or Criteo TSV (no header) file."""
    dispatch.use_etl_memory_pool()
    data = _read_range(piece, skip_header=(fmt == "csv"))
    delimiter = "\t" if fmt == "criteo" else ","
    if not data.strip():
        table = empty_table(names, convert)
    else:
        try:
            table = pacsv.read_csv(
                pa.BufferReader(data),
                read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 26),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=convert,
            )
        except (pa.ArrowInvalid, OSError, EOFError) as e:
            raise DatasetError(f"cannot parse {piece.path} as {fmt}: {e}") from None
    if columns is not None:
        table = table.select(columns)
    return arrow_to_frame(table)


def empty_table(names: list[str], convert: pacsv.ConvertOptions) -> pa.Table:
    types = convert.column_types or {}
    return pa.schema([(n, types.get(n, pa.float64())) for n in names]).empty_table()


def csv_header_and_types(path: str) -> tuple[list[str], pacsv.ConvertOptions]:
    """Column names from the header and types inferred from the first lines of a CSV file.

    Numeric columns are read as float64 (a column of integers in the sample may hold decimals or
    nulls later), everything else as dictionary-encoded strings.
    """
    opener = gzip.open if _is_gz(path) else open
    with opener(path, "rb") as fh:
        sample = fh.read(1 << 20)
    if not sample.strip():
        raise DatasetError(f"{path} is empty")
    sample = sample[: sample.rfind(b"\n") + 1] or sample
    try:
        table = pacsv.read_csv(pa.BufferReader(sample))
    except pa.ArrowInvalid as e:
        raise DatasetError(f"cannot parse {path} as CSV: {e}") from None
    types = {}
    for f in table.schema:
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_null(f.type)
        types[f.name] = pa.float64() if numeric else pa.dictionary(pa.int32(), pa.string())
    return table.column_names, pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)

