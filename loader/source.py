"""Resolve a loader ``source`` into parquet files, their pieces, and the columns to deliver.

A source is a processed directory (``OUT/train``, ``OUT/valid``, or any directory of parquet files;
column kinds come from ``schema.json`` found there or one level up), a parquet file, a list of
parquet files, or anything with a ``.files`` attribute (``ctrflow.etl.Dataset``, duck-typed so this
module never imports Dask). ``cats`` / ``conts`` / ``labels`` override the schema, which is how
parquet written by other tools is loaded.

Only footers are read here. Row groups become *pieces*: consecutive row groups of one file are
merged until a piece holds at least ``min_piece_rows`` rows, so that files written with small row
groups are still read in big pieces.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctrflow.etl.schema import Schema, SchemaError

MIN_PIECE_ROWS = 131072


@dataclass(frozen=True)
class Columns:
    """The columns a loader delivers, by kind, and the categorical dtype.

    Attributes:
        cats: categorical columns -> ``Batch.categorical`` [B, n_cat].
        conts: continuous columns -> ``Batch.continuous`` [B, n_cont] float32.
        labels: label columns -> ``Batch.label`` [B] (the first) float32.
        cat_dtype: int32, or int64 when a categorical column is stored as 64-bit.
        lists: list columns -> ``Batch.lists`` (values + offsets; see ``ctrflow.loader.lists``).
        list_weights: the weight column of each list column (``None``: none), aligned with ``lists``.
    """

    cats: tuple[str, ...]
    conts: tuple[str, ...]
    labels: tuple[str, ...]
    cat_dtype: torch.dtype
    lists: tuple[str, ...] = ()
    list_weights: tuple[str | None, ...] = ()

    @property
    def list_columns(self) -> tuple[str, ...]:
        """List columns and their weight columns: what is read besides ``cats`` and ``floats``."""
        return self.lists + tuple(w for w in self.list_weights if w)

    @property
    def floats(self) -> tuple[str, ...]:
        """Continuous then label columns: they share one float32 buffer."""
        return self.conts + self.labels


@dataclass(frozen=True)
class Piece:
    """Consecutive row groups ``row_groups`` of file number ``file``, ``rows`` rows in all."""

    file: int
    row_groups: tuple[int, ...]
    rows: int


@dataclass
class Source:
    """Everything the loader needs to know about its data before reading any of it."""

    files: list[str]
    metadata: list[pq.FileMetaData]
    pieces: list[Piece]
    columns: Columns
    schema: Schema | None
    # Page layouts of plain columns, parsed on first read (``ctrflow.loader.pages.read_row_groups``).
    page_layouts: dict[tuple[str, int, int], Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)


def _parquet_in(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.parquet")))


def _find_schema(directory: str) -> Schema | None:
    for d in (directory, os.path.dirname(os.path.abspath(directory))):
        if os.path.exists(os.path.join(d, "schema.json")):
            return Schema.load(d)
    return None


def _files_and_schema(source: Any) -> tuple[list[str], Schema | None]:
    if hasattr(source, "files"):  # ctrflow.etl.Dataset (or anything shaped like it)
        files = [os.fspath(f) for f in source.files]
        schema = getattr(source, "schema", None)
        if schema is None and files:
            schema = _find_schema(os.path.dirname(files[0]))
        return files, schema
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = _parquet_in(path)
            if not files:
                splits = [s for s in ("train", "valid") if _parquet_in(os.path.join(path, s))]
                hint = f"; pass {' or '.join(os.path.join(path, s) for s in splits)}" if splits else ""
                raise ValueError(f"{path} holds no *.parquet files{hint}")
            return files, _find_schema(path)
        if os.path.isfile(path):
            return [path], _find_schema(os.path.dirname(path) or ".")
        raise FileNotFoundError(f"loader source {path} does not exist")
    if isinstance(source, (list, tuple)):
        files = [os.fspath(f) for f in source]
        if not files:
            raise ValueError("loader source is an empty list of files")
        return files, _find_schema(os.path.dirname(files[0]) or ".")
    raise TypeError(
        f"loader source must be a directory, a parquet file, a list of files or a Dataset, "
        f"not {type(source).__name__}"
    )


class ColumnTypeError(TypeError, ValueError):
    """A column's type does not fit what the loader delivers (a user error: bad data, not a bug).

    A ``TypeError`` as before, and a ``ValueError`` like the loader's other input errors, so callers
    catching either see it.
    """


def _cat_dtype(names: tuple[str, ...], arrow_schema: pa.Schema, schema: Schema | None) -> torch.dtype:
    for name in names:
        t = arrow_schema.field(name).type
        if not pa.types.is_integer(t):
            raise ColumnTypeError(f"categorical column {name!r} has type {t}; categorical ids must be integers "
                                  "(is this raw data? the loader reads etl/run.py's output: run it on the raw files)")
        wide = t.bit_width > 32 or (t.bit_width == 32 and pa.types.is_unsigned_integer(t))
        if schema is not None and name in schema.categorical:
            card = schema[name].cardinality or 0
            wide = wide and card > 2**31 - 1  # int64 storage of small ids still fits int32
        if wide:
            return torch.int64
    return torch.int32


def _pieces(metadata: list[pq.FileMetaData], min_rows: int) -> list[Piece]:
    pieces = []
    for f, md in enumerate(metadata):
        group: list[int] = []
        rows = 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n == 0:
                continue
            group.append(rg)
            rows += n
            if rows >= min_rows:
                pieces.append(Piece(f, tuple(group), rows))
                group, rows = [], 0
        if group:
            pieces.append(Piece(f, tuple(group), rows))
    return pieces


def resolve(
    source: Any,
    cats: list[str] | None = None,
    conts: list[str] | None = None,
    labels: list[str] | None = None,
    min_piece_rows: int | None = None,
    lists: list[str] | None = None,
    list_weights: dict[str, str] | None = None,
) -> Source:
    """Resolve ``source`` and check that the requested columns exist with usable types.

    Args:
        source: see the module docstring.
        cats, conts, labels: column names overriding the schema's kinds (``None``: from the schema).
        lists: list columns (``None``: the schema's, none without a schema).
        list_weights: ``{list column: weight column}`` (``None``: the schema's ``weights`` entries).
        min_piece_rows: merge row groups of a file until a piece holds this many rows
            (``None``: ``MIN_PIECE_ROWS``).

    Returns:
        A ``Source``. Raises ``ValueError`` / ``TypeError`` / ``SchemaError`` with one clear line.
    """
    files, schema = _files_and_schema(source)
    if schema is None and (cats is None and conts is None and labels is None):
        raise SchemaError(
            "no schema.json next to the data: pass cats=[...], conts=[...], labels=[...] to the Loader"
        )
    cats_t = tuple(cats if cats is not None else (schema.categorical if schema else []))
    conts_t = tuple(conts if conts is not None else (schema.continuous if schema else []))
    labels_t = tuple(labels if labels is not None else (schema.label if schema else []))
    lists_t = tuple(lists if lists is not None else (schema.lists if schema else []))
    if not (cats_t or conts_t or labels_t or lists_t):
        raise ValueError("the loader has no columns to deliver (cats, conts and labels are all empty)")

    metadata = []
    for f in files:
        try:
            metadata.append(pq.read_metadata(f))
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{f} is not a readable parquet file ({e})") from None
    arrow_schema = metadata[0].schema.to_arrow_schema()
    missing = [c for c in cats_t + conts_t + labels_t if arrow_schema.get_field_index(c) < 0]
    if missing:
        raise ValueError(
            f"{files[0]} has no column(s) {', '.join(missing)} (it has: {', '.join(arrow_schema.names)})"
        )
    for name in conts_t + labels_t:
        t = arrow_schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise ColumnTypeError(f"column {name!r} has type {t}; continuous and label columns must be numeric "
                                  "(is this raw data? the loader reads etl/run.py's output: run it on the raw files)")
    weights_t = _list_weights(lists_t, list_weights, schema)
    _check_lists(lists_t, weights_t, arrow_schema)
    columns = Columns(cats_t, conts_t, labels_t, _cat_dtype(cats_t, arrow_schema, schema), lists_t, weights_t)
    min_rows = MIN_PIECE_ROWS if min_piece_rows is None else min_piece_rows
    return Source(files, metadata, _pieces(metadata, min_rows), columns, schema)


def _list_weights(lists: tuple[str, ...], given: dict[str, str] | None, schema: Schema | None
                  ) -> tuple[str | None, ...]:
    if given is not None:
        unknown = sorted(set(given) - set(lists))
        if unknown:
            raise ValueError(f"list_weights names {', '.join(unknown)}, which are not loaded list columns")
        return tuple(given.get(n) for n in lists)
    if schema is None:
        return (None,) * len(lists)
    names = {c.name for c in schema.columns}
    return tuple(schema[n].weights if n in names else None for n in lists)


def _check_lists(lists: tuple[str, ...], weights: tuple[str | None, ...], arrow_schema: pa.Schema) -> None:
    for name, weight in zip(lists, weights, strict=True):
        for col, want in ((name, "integer"), (weight, "floating")):
            if col is None:
                continue
            if arrow_schema.get_field_index(col) < 0:
                raise ValueError(f"the data has no list column {col!r} (it has: {', '.join(arrow_schema.names)})")
            t = arrow_schema.field(col).type
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
                pa.types.is_integer(t.value_type) if want == "integer" else pa.types.is_floating(t.value_type))
            if not ok:
                raise TypeError(f"column {col!r} has type {t}; expected a list of {want} values")
