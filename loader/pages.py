"""Plain-page fast path: REQUIRED, PLAIN, uncompressed numeric columns read as views of the file.

The ETL writes processed columns the loader can read without decoding: no compression, PLAIN
encoding, no nulls (the fields are REQUIRED, so pages carry no definition levels). A data page of
such a column is a thrift page header followed by the little-endian values themselves, so the values
can be used where they lie: the loader maps the byte range of the row groups it needs and hands out
zero-copy numpy views of each page. The builder's one copy into the batch buffers is then the only
copy (pyarrow's decode is a copy of its own before the builder's: the loader needs half the CPU per
row with the views, bench/RESULTS.md "Loader"). The ETL writes one page per column chunk
(``ctrflow.etl.parquet_layout``): with pyarrow's default 20k-row pages the many small copies contend
for the GIL once several threads copy.

Eligibility is checked per column chunk from the footer (physical type equal to the Arrow type,
``UNCOMPRESSED``, no dictionary page, max definition and repetition level 0) and then per page while
walking the headers (a DATA_PAGE or DATA_PAGE_V2 with PLAIN values, no nulls, values exactly
``num_values * itemsize`` bytes, page counts summing to the row group's rows). Anything else (lists,
dictionary or compressed pages, nullable columns, another tool's encodings) is read by pyarrow as
before, column by column, so mixed files work. Page layouts are parsed once per column chunk and
kept on the ``Source`` (a few offsets per page). Set ``CTRFLOW_PLAIN_PAGES=0`` to always use pyarrow.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ENABLED = (os.environ.get("CTRFLOW_PLAIN_PAGES", "1") != "0" and sys.byteorder == "little"
           and hasattr(mmap, "MAP_SHARED"))  # POSIX mmap flags

_PHYSICAL = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FLOAT": np.dtype("<f4"), "DOUBLE": np.dtype("<f8")}
_ARROW = {np.dtype("<i4"): pa.int32(), np.dtype("<i8"): pa.int64(), np.dtype("<f4"): pa.float32(),
          np.dtype("<f8"): pa.float64()}
_DATA_PAGE, _DATA_PAGE_V2, _PLAIN = 0, 3, 0
# Fields read from the thrift structs (parquet.thrift): PageHeader 1 type, 3 compressed_page_size,
# 5 DataPageHeader {1 num_values, 2 encoding}, 8 DataPageHeaderV2 {1 num_values, 2 num_nulls,
# 4 encoding, 5 definition_levels_byte_length, 6 repetition_levels_byte_length}.
_PAGE_HEADER = {1: "i", 3: "i", 5: {1: "i", 2: "i"}, 8: {1: "i", 2: "i", 4: "i", 5: "i", 6: "i"}}

Layout = tuple[np.ndarray, np.ndarray]  # (byte offsets of each page's values in the file, values per page)


# ---- thrift compact protocol (just enough to walk page headers) --------------------------------
def _varint(b: Any, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        if x < 0x80:
            return out, i
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(b: Any, i: int, t: int, in_collection: bool = False) -> int:
    """Index after a value of compact type ``t`` starting at ``i``."""
    if t in (1, 2):  # booleans: in the field header, or one byte inside a list/set/map
        return i + 1 if in_collection else i
    if t == 3:
        return i + 1
    if t in (4, 5, 6):
        return _varint(b, i)[1]
    if t == 7:
        return i + 8
    if t == 8:
        n, i = _varint(b, i)
        return i + n
    if t in (9, 10):
        head = b[i]
        i += 1
        n, et = head >> 4, head & 15
        if n == 15:
            n, i = _varint(b, i)
        for _ in range(n):
            i = _skip(b, i, et, True)
        return i
    if t == 11:
        n, i = _varint(b, i)
        if n:
            kv = b[i]
            i += 1
            for _ in range(n):
                i = _skip(b, _skip(b, i, kv >> 4, True), kv & 15, True)
        return i
    if t == 12:
        return _struct(b, i, {})[1]
    raise ValueError(f"unknown thrift compact type {t}")


def _struct(b: Any, i: int, want: dict[int, Any]) -> tuple[dict[int, Any], int]:
    """Read a struct at ``i``: the integer / nested-struct fields named in ``want``, skipping the rest."""
    out: dict[int, Any] = {}
    last = 0
    while True:
        head = b[i]
        i += 1
        if head == 0:
            return out, i
        t, delta = head & 15, head >> 4
        if delta:
            fid = last + delta
        else:
            v, i = _varint(b, i)
            fid = _zigzag(v)
        last = fid
        spec = want.get(fid)
        if spec == "i" and t in (4, 5, 6):
            v, i = _varint(b, i)
            out[fid] = _zigzag(v)
        elif isinstance(spec, dict) and t == 12:
            out[fid], i = _struct(b, i, spec)
        else:
            i = _skip(b, i, t)


# ---- eligibility and layouts -------------------------------------------------------------------
def plain_columns(pf_schema: pq.ParquetSchema, arrow_schema: pa.Schema,
                  names: list[str]) -> dict[str, tuple[int, np.dtype]]:
    """The flat REQUIRED numeric columns among ``names``: ``{name: (column index, values dtype)}``."""
    if not ENABLED:
        return {}
    index = {pf_schema.column(i).path: i for i in range(len(pf_schema))}
    out = {}
    for n in names:
        i = index.get(n)
        if i is None:
            continue
        c = pf_schema.column(i)
        dtype = _PHYSICAL.get(c.physical_type)
        if (dtype is not None and c.max_definition_level == 0 and c.max_repetition_level == 0
                and arrow_schema.field(n).type == _ARROW[dtype]):
            out[n] = (i, dtype)
    return out


def _chunk_ok(cc: pq.ColumnChunkMetaData) -> bool:
    return cc.compression == "UNCOMPRESSED" and not cc.has_dictionary_page


def page_layout(buf: Any, base: int, cc: pq.ColumnChunkMetaData, rows: int, dtype: np.dtype) -> Layout | None:
    """Walk the page headers of column chunk ``cc`` in ``buf`` (file byte ``base`` is ``buf[0]``).

    Returns:
        ``(value offsets, value counts)`` of its data pages, or ``None`` when a page is not a plain,
        null-free data page (the caller reads the column with pyarrow).
    """
    start = cc.data_page_offset
    end = start + cc.total_compressed_size
    offsets, counts = [], []
    i = start - base
    try:
        while i < end - base:
            h, j = _struct(buf, i, _PAGE_HEADER)
            size = h.get(3, -1)
            if h.get(1) == _DATA_PAGE and 5 in h:
                n, skip = h[5].get(1, -1), 0
                if h[5].get(2) != _PLAIN:
                    return None
            elif h.get(1) == _DATA_PAGE_V2 and 8 in h:
                v2 = h[8]
                n, skip = v2.get(1, -1), v2.get(5, 0) + v2.get(6, 0)
                if v2.get(4) != _PLAIN or v2.get(2, 0) != 0:
                    return None
            else:  # dictionary / index page, or an unknown header
                return None
            if n < 0 or size - skip != n * dtype.itemsize:
                return None
            offsets.append(base + j + skip)
            counts.append(n)
            i = j + size
    except (IndexError, ValueError):  # a header that runs past the chunk: not ours to decode
        return None
    if i != end - base or sum(counts) != rows:
        return None
    return np.asarray(offsets, np.int64), np.asarray(counts, np.int64)


def read_row_groups(path: str, md: pq.FileMetaData, rgs: list[int], names: list[str],
                    layouts: dict[tuple[str, int, int], Layout | None]) -> pa.Table:
    """``ParquetFile.read_row_groups(rgs, columns=names)``, with plain columns as views of the file.

    Args:
        path: the parquet file; md: its footer.
        rgs: row groups to read, in order.
        names: columns.
        layouts: page layouts parsed so far, ``{(path, row group, column index): layout | None}``
            (updated here; ``None`` marks a column chunk pyarrow must decode).

    Returns:
        A table with ``names``: plain columns as chunked arrays of zero-copy page views (they keep the
        mapping alive), the others decoded by pyarrow.
    """
    pf = pq.ParquetFile(path, metadata=md, memory_map=True)
    plain = plain_columns(pf.schema, pf.schema_arrow, names)
    plain = {n: v for n, v in plain.items() if all(_chunk_ok(md.row_group(rg).column(v[0])) for rg in rgs)}
    arrays: dict[str, pa.ChunkedArray] = {}
    if plain and all(md.row_group(rg).num_rows for rg in rgs):
        chunks = [md.row_group(rg).column(i) for rg in rgs for i, _ in plain.values()]
        lo = min(c.data_page_offset for c in chunks)
        hi = max(c.data_page_offset + c.total_compressed_size for c in chunks)
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as fh:  # (MAP_POPULATE measured no faster: the copies fault the pages in)
            # A footer that points past the end of the file (a truncated or replaced file): let pyarrow
            # read it and say what is wrong (mmap would only refuse the length).
            buf = None if hi > os.fstat(fh.fileno()).st_size else mmap.mmap(
                fh.fileno(), hi - base, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
        if buf is None:
            plain = {}
        for n, (i, dtype) in plain.items():
            pieces = []
            for rg in rgs:
                key = (path, rg, i)
                if key not in layouts:
                    layouts[key] = page_layout(buf, base, md.row_group(rg).column(i), md.row_group(rg).num_rows, dtype)
                lay = layouts[key]
                if lay is None:
                    break
                pieces += [pa.array(np.frombuffer(buf, dtype, int(c), int(o) - base))
                           for o, c in zip(*lay, strict=True)]
            else:
                arrays[n] = pa.chunked_array(pieces, _ARROW[dtype])
    rest = [n for n in names if n not in arrays]
    if rest:
        decoded = pf.read_row_groups(rgs, columns=rest, use_threads=True)
        arrays.update({n: decoded.column(n) for n in rest})
    return pa.table({n: arrays[n] for n in names})
