"""How processed parquet is laid out: the writer's options, shared by the ETL and the benchmarks.

No Dask here, so that ``bench/loader.py`` writes exactly the ETL's layout on a machine without it.
"""

from __future__ import annotations

import inspect
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MIN_ROW_GROUP = 256 * 1024
PLAIN_PAGE_BYTES = 1 << 30  # plain pages are cut by rows (one per column chunk), not by bytes
_HAS_ROWS_PER_PAGE = "max_rows_per_page" in inspect.signature(pq.ParquetWriter.__init__).parameters


def mark_required(table: pa.Table, metadata: dict | None = None) -> pa.Table:
    """``table`` with every column that holds no null declared REQUIRED.

    A REQUIRED column has no definition levels: pyarrow reads plain int32/float32 pages 1.6x as
    fast (bench/RESULTS.md, "Loader"), and ``ctrflow.loader.pages`` copies the values straight out
    of the file. Each file says what it holds, so a column with nulls in one partition stays
    OPTIONAL in that file only.
    """
    fields = [f.with_nullable(table.column(f.name).null_count > 0) for f in table.schema]
    return table.cast(pa.schema(fields, metadata=metadata))


def write_options(compression: str, row_group_size: int) -> dict[str, Any]:
    """``pq.write_table`` keyword arguments for ``compression`` (``none``: plain pages) and row groups.

    ``none`` writes PLAIN, uncompressed pages, one per column chunk (pyarrow's default cuts a page
    every 20k rows / 1 MB): the loader copies each page's values out of the file, and one big copy
    per column beats 13+ small ones, which contend for the GIL when the copies run on several
    threads (unshuffled with 2 copy threads: 50.23M vs 15.00M rows/s on 2 cores; bench/RESULTS.md,
    "Loader"). Other codecs write dictionary-encoded, compressed pages with pyarrow's default page size.
    """
    plain = compression == "none"
    out: dict[str, Any] = {"row_group_size": row_group_size, "compression": compression, "use_dictionary": not plain}
    if plain:
        out["data_page_size"] = PLAIN_PAGE_BYTES
        if _HAS_ROWS_PER_PAGE:
            out["max_rows_per_page"] = row_group_size
    return out
